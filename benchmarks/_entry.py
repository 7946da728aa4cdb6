"""Shared entry of the benchmarks/bench_*.py scripts: `nanoseek bench KIND ...` from a checkout,
installed or not."""

import sys
from pathlib import Path


def run(kind: str) -> int:
    try:
        from nanoseek import bench
    except ImportError:  # run from a checkout without installing
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        from nanoseek import bench
    return bench.main([kind, *sys.argv[1:]])
