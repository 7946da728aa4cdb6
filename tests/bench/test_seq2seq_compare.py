"""benchmarks/seq2seq_compare.py at a tiny budget: both models train, decode and land in the JSON lines and plot."""

import json

import pytest

pytest.importorskip("sacrebleu")


def test_the_comparison_runs_at_a_tiny_budget(tmp_path, load_benchmark):
    script = load_benchmark("seq2seq_compare")
    argv = ["--task", "reverse", "--seconds", "1", "--threads", "1", "--sentences", "6", "--eval-every", "2",
            "--beam", "2", "--show", "2", "--out", str(tmp_path), "--override", "data.seq_len=10",
            "--override", "model.hidden_size=32", "--override", "model.intermediate_size=64"]  # fmt: skip
    assert script.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["architecture"], r["decoding"]) for r in rows] == [
        ("encoder_decoder", "greedy"), ("encoder_decoder", "beam2"), ("decoder", "greedy"), ("decoder", "beam2")
    ]  # fmt: skip
    assert all({"bleu", "chrf", "exact_length_rate", "train_seconds", "params_non_embedding"} <= set(r) for r in rows)
    ed, dec = rows[0]["params_non_embedding"], rows[2]["params_non_embedding"]
    assert abs(ed - dec) / ed < 0.2  # the decoder-only depth matches the parameters
    assert rows[2]["layers"][0] == 0 and rows[0]["layers"] == [2, 2]
    assert (tmp_path / "seq2seq_compare.png").stat().st_size > 10_000
    assert len((tmp_path / "samples.txt").read_text().splitlines()) == 3


def test_the_decoder_twin_has_the_closest_depth(load_benchmark):
    from nanoseek.config import ModelConfig
    from nanoseek.model import model_info

    ed = ModelConfig.from_preset("vaswani-tiny-ed")
    twin = load_benchmark("seq2seq_compare").decoder_twin(ed)
    size = lambda config: model_info(config)["params_active_non_embedding"]
    gaps = {n: abs(size(twin.replace(num_hidden_layers=n)) - size(ed)) for n in range(1, 9)}
    assert twin.architecture == "decoder" and gaps[twin.num_hidden_layers] == min(gaps.values())
    assert twin.hidden_size == ed.hidden_size and twin.intermediate_size == ed.intermediate_size
