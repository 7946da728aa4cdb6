"""The `nanoseek` command: a table of verbs, each a `Command` of one module here that parses its
arguments and calls one library function.

    nanoseek train [CONFIG.toml] [--preset NAME] [--data PATH ...] [--out DIR] [--max-steps N]
                   [--resume] [--nproc N] [--section.field=VALUE ...]
    nanoseek ablate --variant [NAME:]SPEC ... [--preset NAME] [--out DIR] [--section.field=VALUE ...]
    nanoseek tokenizer train FILE... [--vocab-size N] [--kind bpe|char] [--out FILE]
    nanoseek sample CKPT [--prompt TEXT --max-new-tokens N --temperature T --top-k K --top-p P --seed S ...]
    nanoseek sample CKPT --source TEXT [--beam K --length-penalty A]
    nanoseek chat CKPT [--system TEXT ...]
    nanoseek eval CKPT [--data PATH --seq-len N --batch-size B --max-batches M]
                       [--beam K --length-penalty A --max-sentences N --samples N]
    nanoseek info (CKPT | --preset NAME) [--seq-len N]
    nanoseek presets [--json]
    nanoseek convert SRC DST --to {hf,nanoseek} [--dtype float32|bfloat16]
    nanoseek average RUN [--last K --out DIR]
    nanoseek serve CKPT [--host H --port P --api-key KEY ...]
    nanoseek embed CKPT (--text TEXT ... | --file FILE)
    nanoseek inspect {fusion,attention} CKPT --prompt TEXT [--layer L --out PNG]
    nanoseek bench WHAT ...

Bad input (NanoseekError) prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from nanoseek.cli import analysis, bench, generate, models, serve, train
from nanoseek.cli.common import Command, split_argv
from nanoseek.errors import NanoseekError

ORDER = (
    "train",
    "sample",
    "eval",
    "info",
    "presets",
    "chat",
    "serve",
    "convert",
    "average",
    "embed",
    "inspect",
    "ablate",
    "tokenizer",
    "bench",
)
_ALL = {c.name: c for module in (train, generate, models, serve, analysis, bench) for c in module.COMMANDS}
assert set(_ALL) == set(ORDER), f"ORDER must list every command: {sorted(set(_ALL) ^ set(ORDER))}"
COMMANDS: dict[str, Command] = {name: _ALL[name] for name in ORDER}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoseek", description="Train, evaluate and run DeepSeek-style models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        p = sub.add_parser(
            command.name,
            help=command.help,
            description=command.help,
            add_help=command.add_help,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv, overrides = split_argv(list(sys.argv[1:] if argv is None else argv))
    args, extra = build_parser().parse_known_args(argv)
    extra += overrides
    try:
        return args.run(args, extra)
    except NanoseekError as e:
        print(f"nanoseek: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nanoseek: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`nanoseek presets | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    raise SystemExit(main())
