"""What the commands share: the command record, argument helpers, and loading a checkpoint on the
device `--device` names.

One spelling for what several commands take: `--threads N`, `--device D`, `--compile`, `--json`
(`train` and `ablate` also `--dtype`, `--max-steps`, `--max-tokens`, `--max-seconds`, each the same as
its `--train.FIELD=VALUE` override)."""

from __future__ import annotations

import argparse
import errno
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoseek.config import parse_value
from nanoseek.config.validate import MAX_INT, MAX_THREADS, Range, check_range
from nanoseek.device import add_device_arg, resolve_device
from nanoseek.errors import NanoseekError
from nanoseek.io import LoadedCheckpoint, load_checkpoint


@dataclass(frozen=True)
class Command:
    """One verb: `add_arguments(parser)` declares its flags, `run(args, extra) -> exit status` does it.
    `extra` holds the arguments argparse did not know (`--section.field=VALUE` overrides)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, list[str]], int]
    add_help: bool = True  # False: the command parses its own --help (bench)


def reject_extra(extra: list[str]) -> None:
    """Commands without overrides: the first unknown argument is an error."""
    if extra:
        raise NanoseekError(f"unrecognized argument {extra[0]!r}")


OVERRIDE = re.compile(r"--[A-Za-z_]\w*(\.\w+)+=")


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the arguments argparse parses, the `--section.field=VALUE` overrides). Overrides are set
    aside first: argparse would take one whose value holds a space (a JSON list) for a positional."""
    overrides = [a for a in argv if OVERRIDE.match(a)]
    return [a for a in argv if not OVERRIDE.match(a)], overrides


def split_overrides(extra: list[str]) -> dict:
    """`--a.b=v` -> {"a.b": parsed v}; anything else is an error."""
    overrides = {}
    for arg in extra:
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise NanoseekError(f"unrecognized argument {arg!r}; overrides look like --section.field=VALUE")
        if "=" not in arg:
            raise NanoseekError(f"override {arg!r} has no value; write it as {arg}=VALUE")
        key, value = arg[2:].split("=", 1)
        overrides[key] = parse_value(value)
    return overrides


# Every numeric flag, by name, with its valid values: a flag means the same in every command that has it.
FLAG_RANGES = {
    "threads": Range(0, MAX_THREADS),  # 0 = torch's default
    "temperature": Range(0),
    "max_new_tokens": Range(1),
    "top_k": Range(1),
    "top_p": Range(0, 1, low_open=True),
    "repetition_penalty": Range(0, low_open=True),
    "seed": Range(0, MAX_INT),
    "seq_len": Range(1),
    "batch_size": Range(1),
    "max_batches": Range(1),
    "layer": Range(0),
    "max_steps": Range(0),
    "nproc": Range(1),
    "port": Range(1, 65535),
    "max_batch": Range(1),
    "max_queue": Range(0),
    "max_tokens": Range(0),  # train: 0 = no limit; serve checks its own >= 1
    "max_body_bytes": Range(1),
}


def check_flags(args: argparse.Namespace) -> None:
    """Every numeric flag given is finite and within its `FLAG_RANGES` entry; else one line naming it."""
    for name, valid in FLAG_RANGES.items():
        value = getattr(args, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            check_range(f"--{name.replace('_', '-')}", value, valid)


def check_output_path(path: str | Path, what: str, folder: bool = True) -> Path:
    """`path` can be created (or replaced) as a folder (or a file): no file where a folder must be,
    and the nearest existing folder above it is writable. Checked before any work is done."""
    path = Path(path)
    if path.exists() and folder and not path.is_dir():
        raise NanoseekError(f"{what} {path} is a file; give a folder")
    if path.is_dir() and not folder:
        raise NanoseekError(f"{what} {path} is a folder; give a file path")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NanoseekError(f"{what} {path}: {parent} is a file, not a folder")
    try:  # a folder made and removed: what the command will do there (processes side by side get their own)
        os.rmdir(tempfile.mkdtemp(prefix=".nanoseek-write-test-", dir=parent))
    except OSError as e:
        raise NanoseekError(f"{what} {path}: cannot write in {parent} ({os_reason(e)})") from None
    return path


def os_reason(error: OSError) -> str:
    """The reason of a file-system error in words ("No space left on device")."""
    return error.strerror or errno.errorcode.get(error.errno or 0, "") or str(error)


def describe_os_error(error: OSError) -> str:
    """One line for a file-system error the command hit: the file, and the reason in words."""
    return f"{error.filename}: {os_reason(error)}" if error.filename else f"file system error: {os_reason(error)}"


def add_checkpoint_args(parser: argparse.ArgumentParser, device: bool = True) -> None:
    """The positional CKPT (checkpoint, run folder or HF folder), --trust-pickle and --device."""
    parser.add_argument("ckpt", help="a checkpoint folder, a run folder (its latest checkpoint) or an HF folder")
    add_trust_pickle(parser)
    if device:
        add_device_arg(parser)


def add_trust_pickle(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow a pickle-based pytorch_model.bin (loaded with weights_only=True)",
    )


def add_compile_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compiled static-shape decode step (compiles once, then much faster per token)",
    )
    parser.add_argument(
        "--compile-prefill",
        action="store_true",
        help="prompt prefill under torch.compile with dynamic shapes (one graph for every prompt "
        "length; its first compile is long, so it pays off for long or many prompts)",
    )


THREADS_HELP = (
    "torch threads (default: torch's, one per core). On a machine other busy processes share, "
    "fewer is faster: about cores / busy processes (docs/performance.md#threads)"
)


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, help=THREADS_HELP)


def set_threads(threads: int | None) -> None:
    """`--threads N`: N torch threads (unset or 0: torch's default)."""
    if threads is not None and threads < 0:
        raise NanoseekError(f"--threads={threads} must be >= 1 (or 0 for torch's default)")
    if threads:
        torch.set_num_threads(threads)


def add_json_arg(parser: argparse.ArgumentParser, what: str = "the result") -> None:
    parser.add_argument("--json", action="store_true", help=f"{what} as JSON (one object per line) for programs")


def aligned(rows: list[tuple[str, str]]) -> str:
    """Label/value lines with the values in one column.

    >>> print(aligned([("loss", "1.5"), ("perplexity", "4.5")]))
    loss        1.5
    perplexity  4.5
    """
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}".rstrip() for label, value in rows)


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """A plain text table, columns padded to their widest cell (numbers too are given as text)."""
    cells = [header, *rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def human_count(n: float) -> str:
    """A count with its unit: 671026404352 -> '671.0B', 1234567 -> '1.23M', 950 -> '950'.

    >>> human_count(671026404352), human_count(36625603584), human_count(1720000), human_count(65)
    ('671.0B', '36.6B', '1.72M', '65')
    """
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if round(n / size, 2) >= 1:
            value = n / size
            return f"{value:.1f}{unit}" if value >= 10 else f"{value:.2f}{unit}"
    return f"{n:g}"


def load(args: argparse.Namespace, tokenizer: bool = True, encoder_decoder: bool = False) -> LoadedCheckpoint:
    """(model, tokenizer, folder) of `args.ckpt` on `args.device` (the CPU where the command has none).
    An encoder-decoder checkpoint is refused unless the command reads one (`encoder_decoder`)."""
    device = resolve_device(getattr(args, "device", "cpu"), where="--device")
    loaded = load_checkpoint(args.ckpt, trust_pickle=args.trust_pickle, tokenizer=tokenizer, device=device)
    if not encoder_decoder and loaded.model.config.architecture == "encoder_decoder":
        raise NanoseekError(
            f"{args.ckpt} is an encoder-decoder model; `nanoseek {getattr(args, 'command', '')}` needs a "
            "decoder-only one (encoder-decoders work with sample --source, eval, info and serve)"
        )
    return loaded
