"""The OpenAI-compatible server under concurrent streaming clients.

    python benchmarks/bench_serve.py [CKPT] --clients 1,4,16 --seconds 30

The same as `nanoseek bench serve ...`; prints one JSON object per line.
"""

from _entry import run

if __name__ == "__main__":
    raise SystemExit(run("serve"))
