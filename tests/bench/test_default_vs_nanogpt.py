"""benchmarks/default_vs_nanogpt.py at a tiny budget: both runs are scored on the same held-out bytes."""

import json

import numpy as np
import pytest


@pytest.mark.slow  # two training processes and two full evaluations: ~1 minute
def test_both_runs_are_scored_on_the_same_bytes(tmp_path, load_benchmark):
    tiny = ["model.hidden_size=32", "model.num_hidden_layers=1", "data.tokenizer=bpe", "data.vocab_size=300"]
    argv = ["--iters", "2", "--threads", "1", "--out", str(tmp_path)] + [f"--override={o}" for o in tiny]
    load_benchmark("default_vs_nanogpt").main(argv)
    recipe, ours, summary = [
        json.loads(line) for line in (tmp_path / "default_vs_nanogpt.jsonl").read_text().splitlines()
    ]
    per_char = np.load(tmp_path / "nanogpt_held_out_losses.npy")
    # a subword tokenizer holds out a few bytes fewer than nanoGPT's 10% of chars; nanoGPT is scored on those
    assert 0.95 * len(per_char) < ours["held_out_bytes"] <= len(per_char)
    assert recipe["held_out_bytes"] == ours["held_out_bytes"]
    expected = per_char[-ours["held_out_bytes"] :].mean() / np.log(2)
    assert abs(recipe["held_out_bits_per_byte"] - expected) < 1e-3
    assert summary["bits_per_byte_lower_by"] == round(
        1 - ours["held_out_bits_per_byte"] / recipe["held_out_bits_per_byte"], 4
    )
    assert (tmp_path / "default_vs_nanogpt.png").stat().st_size > 10_000
