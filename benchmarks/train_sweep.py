"""Training tokens/s vs batch x sequence length, nanoseek vs transformers (same weights, same batches).

    python benchmarks/train_sweep.py [--preset deepseek-v3-small] [--out benchmarks/train_shapes.png]

Runs `nanoseek.bench.train.bench_train(preset, ("nanoseek", "hf"))` at each (batch, seq_len) shape, prints
its JSON lines, and draws tokens/s against batch * seq_len for both implementations.
"""

from __future__ import annotations

import argparse
import json

from nanoseek.bench.train import bench_train

SHAPES = ((2, 64), (4, 128), (8, 128), (8, 256), (16, 256))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="deepseek-v3-small")
    parser.add_argument("--out", default="benchmarks/train_shapes.png")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    rows = []
    for batch, seq in SHAPES:
        for r in bench_train(
            args.preset,
            ("nanoseek", "hf"),
            seq_len=seq,
            batch=batch,
            steps=args.steps,
            warmup=2,
            rounds=3,
            threads=2,
            peak_seconds=0.5,
        ):
            print(json.dumps(r), flush=True)
            rows.append(r)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for impl in ("nanoseek", "hf"):
        pts = [r for r in rows if r["impl"] == impl]
        ax.plot([r["batch"] * r["seq_len"] for r in pts], [r["tokens_per_s"] for r in pts], marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch x sequence length (tokens per step)")
    ax.set_ylabel("training tokens/s")
    ax.set_title(f"{args.preset}, fp32, 2 threads")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
