"""Training throughput of nanoseek against the nanoGPT-style reference in `nanoseek/bench/reference_gpt.py`
(or `--peers hf`: transformers on DeepSeek/Llama presets).

    python benchmarks/bench_train.py [--preset gpt2-mini] [--seq-len 64] [--batch 12] ...

The same as `nanoseek bench train ...`; prints one JSON object per line (see nanoseek.bench).
"""

from _entry import run

if __name__ == "__main__":
    raise SystemExit(run("train"))
