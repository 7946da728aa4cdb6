"""Training throughput of nanoseek against the nanoGPT-style reference in `reference_gpt.py`.

    python benchmarks/bench_train.py [--preset gpt2-small] [--seq-len 64] [--batch 12] ...

The same as `nanoseek bench train ...`; prints one JSON object per line (see nanoseek.bench).
"""

import sys
from pathlib import Path

try:
    from nanoseek import bench
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from nanoseek import bench

if __name__ == "__main__":
    raise SystemExit(bench.main(["train", *sys.argv[1:]]))
