"""KV-cache decoding (tokens/s, ms per step, bandwidth fraction) of nanoseek against transformers.

    python benchmarks/bench_decode.py [CKPT | --preset deepseek-v3-small] --compile --batch 1,8 --context 16,256

The same as `nanoseek bench decode ...`; prints one JSON object per line.
"""

from _entry import run

if __name__ == "__main__":
    raise SystemExit(run("decode"))
