"""Prefill and KV-cache decode at long contexts per attention kind (dense MLA, sliding, NSA, DSA, CSA,
HCA, the V4 mix), one equal-shape model each, with the real bytes of each kind's cache.

    python benchmarks/bench_decode_kinds.py --context 1024,4096,16384 --new-tokens 32 --threads 1 \
        --plot benchmarks/decode_kinds.png

The same as `nanoseek bench decode-kinds ...`; prints one JSON object per line.
"""

from _entry import run

if __name__ == "__main__":
    raise SystemExit(run("decode-kinds"))
