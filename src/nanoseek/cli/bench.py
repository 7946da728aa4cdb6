"""`nanoseek bench WHAT ...`: the benchmarks (a table; `--json`: JSON lines), each parsing its own options."""

from __future__ import annotations

from nanoseek.bench import run_bench
from nanoseek.cli.common import Command


def add_bench_arguments(b) -> None:
    b.add_argument("what")


def run(args, extra) -> int:
    return run_bench([args.what, *extra])


COMMANDS = [Command("bench", "benchmarks: a table (--json: JSON lines)", add_bench_arguments, run, add_help=False)]
