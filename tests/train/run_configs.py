"""The tiny training run the tests of tests/train build on (imported by name, as tests/serve/serving.py is)."""

from nanoseek.config import build_train_config


def tiny_cfg(small_corpus, out, **overrides):
    """gpt2-tiny on `small_corpus` for 12 steps of 4 x 32 tokens, a checkpoint every 6, quiet, one thread."""
    base = {
        "data.path": [small_corpus],
        "data.seq_len": 32,
        "train.batch_size": 4,
        "train.max_steps": 12,
        "train.threads": 1,
        "eval.every": 0,
        "eval.batches": 2,
        "eval.batch_size": 4,
        "checkpoint.every": 6,
        "checkpoint.keep_last": 5,
        "log.every": 1,
        "log.progress": False,
        "log.plot": False,
        "schedule.warmup_steps": 3,
        "out": str(out),
    }
    base.update(overrides)
    return build_train_config(preset="gpt2-tiny", overrides=base)
