"""What the commands share: the command record, argument helpers, and loading a checkpoint on the
device `--device` names.

One spelling for what several commands take: `--threads N`, `--device D`, `--compile`, `--json`
(`train` and `ablate` also `--dtype`, `--max-steps`, `--max-tokens`, `--max-seconds`, each the same as
its `--train.FIELD=VALUE` override)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nanoseek.config import parse_value
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


def load(args: argparse.Namespace, tokenizer: bool = True) -> LoadedCheckpoint:
    """(model, tokenizer, folder) of `args.ckpt` on `args.device` (the CPU where the command has none)."""
    device = resolve_device(getattr(args, "device", "cpu"), where="--device")
    return load_checkpoint(args.ckpt, trust_pickle=args.trust_pickle, tokenizer=tokenizer, device=device)
