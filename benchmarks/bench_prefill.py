"""Prompt prefill (tokens/s, time to first token, MFU) of nanoseek against transformers.

    python benchmarks/bench_prefill.py [CKPT | --preset deepseek-v3-small] [--prompt-len 512] [--rounds 5]

The same as `nanoseek bench prefill ...`; prints one JSON object per line.
"""

from _entry import run

if __name__ == "__main__":
    raise SystemExit(run("prefill"))
