"""What the commands share: the command record, argument helpers, and loading a checkpoint on the
device `--device` names."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass

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
