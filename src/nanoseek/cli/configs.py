"""`nanoseek config`: a run's whole config, every field with its value and meaning.

    nanoseek config --preset deepseek-v3-mini            what `nanoseek train --preset ...` would run
    nanoseek config runs/default                         what that run ran with
    nanoseek config my_run.toml --optim.lr=3e-4          a config file, with overrides
    nanoseek config --preset gpt2-mini > my_run.toml     the output is a TOML file `train` reads back

The text form is TOML, one `field = value  # meaning` line per field under its `[section]`; a field
whose value is null (TOML has none) is written commented out, which means the same: its default.
"""

from __future__ import annotations

import json
from pathlib import Path

from nanoseek.cli.common import Command, add_json_arg, split_overrides
from nanoseek.config import TrainConfig, build_train_config
from nanoseek.config.docs import describe
from nanoseek.config.train import RUN_CONFIG_FILE
from nanoseek.errors import NanoseekError


def add_config_arguments(c) -> None:
    c.add_argument(
        "source", nargs="?", help="a run folder, a checkpoint folder or a TOML/JSON config file (default: the preset)"
    )
    c.add_argument("--preset", help="a named config (list them with `nanoseek presets`; default: the demo's)")
    c.epilog = "Overrides --section.field=VALUE apply on top, as for `nanoseek train`."
    add_json_arg(c, "the config and each field's meaning")


def source_file(source: str) -> Path:
    """The config file behind SOURCE: a run's train_config.json, a checkpoint's run config, or a file."""
    path = Path(source)
    if path.is_dir():
        if (path / RUN_CONFIG_FILE).is_file():
            return path / RUN_CONFIG_FILE
        raise NanoseekError(
            f"{path} holds no {RUN_CONFIG_FILE} (not a nanoseek run folder); `nanoseek info {path}` describes a "
            "checkpoint's model"
        )
    if not path.is_file():
        raise NanoseekError(f"{path} is neither a run folder nor a config file")
    return path


def toml_value(value) -> str:
    """A value as TOML (JSON's numbers, strings, booleans and arrays are TOML's; tables inline)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


def config_toml(cfg: TrainConfig) -> str:
    """The config as commented TOML: `[section]  # what it holds`, then `field = value  # meaning`."""
    lines = []
    for section, what, fields in describe(cfg):
        if section:
            lines += ["", f"[{section}]  # {what}"]
        width = min(40, max(len(f"{name} = {toml_value(value)}") for name, value, _ in fields))  # long: unaligned
        for name, value, meaning in fields:
            if value is None:
                line = f"# {name} = null".ljust(width)
            else:
                line = f"{name} = {toml_value(value)}".ljust(width)
            lines.append(f"{line}  # {meaning}")
    return "\n".join(lines)


def run_config(args, extra) -> int:
    overrides = split_overrides(extra)
    if args.source and args.preset:
        raise NanoseekError("give a run folder / config file or --preset, not both")
    file = source_file(args.source) if args.source else None
    cfg = build_train_config(file, args.preset, overrides)
    if args.json:
        meanings = {f"{s}.{name}" if s else name: m for s, _, fields in describe(cfg) for name, _, m in fields}
        print(json.dumps({"config": cfg.to_dict(), "meanings": meanings}))
        return 0
    where = f"{args.source}" if args.source else f"preset {cfg.preset}"
    print(f"# the config of {where}; every field can be set with --section.field=VALUE or in a TOML file like this")
    print(config_toml(cfg))
    return 0


COMMANDS = [
    Command(
        "config", "every config field with its value and meaning (TOML that train reads)", add_config_arguments,
        run_config,
    ),
]  # fmt: skip
