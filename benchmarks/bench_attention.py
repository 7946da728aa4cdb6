"""Dense causal SDPA against each sparse attention kind, by sequence length.

    python benchmarks/bench_attention.py --seq 1024,4096,16384 [--kinds dense,sliding,nsa,dsa,csa,hca] [--plot out.png]

The same as `nanoseek bench attention ...`; prints one JSON object per line.
"""

from _entry import run

if __name__ == "__main__":
    raise SystemExit(run("attention"))
