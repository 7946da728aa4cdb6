"""Benchmarks: `nanoseek bench WHAT [options]`: a table on stdout, or with `--json` one JSON object
per result line (what the benchmarks/ scripts print and RESULTS.md is made from).

WHAT is a key of `BENCHES`; each entry adds its options to an argparse parser and runs, returning
result dicts. Each benchmark lives in its own module (train, infer, decode_kinds, attention, serve); `common`
holds what they measure of the machine; `report` lays results out for people.

    >>> run_bench(["train", "--preset", "gpt2-tiny", "--steps", "2"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from nanoseek.bench.attention import add_attention_args, run_attention
from nanoseek.bench.decode_kinds import add_decode_kinds_args, run_decode_kinds
from nanoseek.bench.infer import add_decode_args, add_prefill_args, run_decode, run_prefill
from nanoseek.bench.report import results_table
from nanoseek.bench.serve import add_serve_args, run_serve
from nanoseek.bench.train import add_train_args, run_train
from nanoseek.config import ModelConfig
from nanoseek.config.parse import did_you_mean
from nanoseek.errors import ArgumentParser, NanoseekError

# WHAT -> (help, add the options, run -> result dicts)
BENCHES: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], list]]] = {
    "train": ("training throughput, nanoseek vs a nanoGPT-style reference", add_train_args, run_train),
    "serve": ("concurrent streaming clients against `nanoseek serve`", add_serve_args, run_serve),
    "attention": (
        "dense causal SDPA vs each sparse attention kind, by sequence length",
        add_attention_args,
        run_attention,
    ),
    "prefill": ("prompt prefill tokens/s, TTFT and MFU, nanoseek vs transformers", add_prefill_args, run_prefill),
    "decode": (
        "KV-cache decode tokens/s and memory-bandwidth use, nanoseek vs transformers",
        add_decode_args,
        run_decode,
    ),
    "decode-kinds": (
        "prefill and KV-cache decode at long contexts, and the cache's bytes, per attention kind",
        add_decode_kinds_args,
        run_decode_kinds,
    ),
}


def _usage() -> str:
    lines = ["usage: nanoseek bench WHAT [options]   (WHAT --help for its options)", "", "WHAT:"]
    lines += [f"  {name:12s} {help_}" for name, (help_, _, _) in BENCHES.items()]
    return "\n".join(lines)


def check_decoder_preset(name: str | None) -> None:
    """The benches time decoder-only models: an encoder-decoder preset is one line of error."""
    if name and ModelConfig.from_preset(name).architecture != "decoder":
        raise NanoseekError(f"--preset {name}: the benches time decoder-only models; {name} is an encoder-decoder")


def run_bench(argv: list[str], json_lines: bool = False) -> int:
    """`nanoseek bench WHAT ...`: the results as a table (with `--json` or `json_lines`: one JSON line
    per result, each printed as soon as it is measured); return 0."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    what, rest = argv[0], argv[1:]
    if what not in BENCHES:
        hint = did_you_mean(what, BENCHES)
        raise NanoseekError(f"unknown benchmark {what!r}{hint}; choose one of: {', '.join(BENCHES)}")
    help_, add_args, run = BENCHES[what]
    parser = ArgumentParser(
        prog=f"nanoseek bench {what}", description=help_, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_args(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object per result line, for programs")
    args = parser.parse_args(rest)
    check_decoder_preset(getattr(args, "preset", None))
    results = []
    for result in run(args):
        if args.json or json_lines:
            print(json.dumps(result), flush=True)
        results.append(result)
    if not (args.json or json_lines):
        print(results_table(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Script entry (benchmarks/bench_train.py): JSON lines; bench errors print as one line, exit status 2."""
    try:
        return run_bench(sys.argv[1:] if argv is None else argv, json_lines=True)
    except NanoseekError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
