"""The memory estimate from a config alone: close under the real parameter count, and a refusal
naming the field that makes a model too large, its estimate and the limit."""

from __future__ import annotations

import pytest
import torch

from nanoseek.config import ModelConfig
from nanoseek.config.memory import _layer_counts, check_memory, estimate_bytes, estimate_params
from nanoseek.config.presets import PRESETS
from nanoseek.errors import NanoseekError
from nanoseek.model import make_model

VARIANTS = [
    dict(fusion="mhc"),
    dict(fusion="hyper"),
    dict(sparse="nsa", nsa_block=8, nsa_topn=3),
    dict(sparse_layers=["sliding", "dense", "dense"], num_hidden_layers=5),
    dict(position="learned"),
    dict(tie_word_embeddings=True),
    dict(ffn="moe", n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1, n_shared_experts=1),
    dict(num_nextn_predict_layers=2),
]


def real_params(config: ModelConfig) -> int:
    with torch.device("meta"):
        model = make_model(config)
    counts = model.num_params()
    return counts["total"] + counts["mtp"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_the_estimate_is_close_under_every_presets_real_count(name):
    config = ModelConfig.from_preset(name)
    real, estimate = real_params(config), estimate_params(config)["total"]
    assert 0.9 * real <= estimate <= real


@pytest.mark.parametrize("changes", VARIANTS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_the_estimate_is_close_under_the_real_count_of_each_kind(changes):
    config = ModelConfig.from_preset("llama-tiny", **changes)
    real, estimate = real_params(config), estimate_params(config)["total"]
    assert 0.85 * real <= estimate <= real


@pytest.mark.parametrize(
    "pattern, layers, ffn, dense_prefix",
    [
        (["dense"], 7, "swiglu", 0),
        (["sliding", "dense"], 7, "moe", 3),
        (["a", "b", "c"], 10, "moe", 4),
        (["x"], 3, "moe", 9),
    ],
)
def test_layer_counts_match_a_loop_over_the_layers(pattern, layers, ffn, dense_prefix):
    class Config:  # only what _layer_counts reads
        sparse_layers, sparse, num_hidden_layers, first_k_dense_replace = pattern, "dense", layers, dense_prefix

    Config.ffn = ffn
    expected: dict = {}
    for i in range(layers):
        key = (pattern[i % len(pattern)], ffn == "moe" and i >= dense_prefix)
        expected[key] = expected.get(key, 0) + 1
    assert _layer_counts(Config) == expected


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(hidden_size=1_000_000_000), "hidden_size=1000000000"),
        (dict(vocab_size=100_000_000_000), "vocab_size=100000000000"),
        (dict(max_position_embeddings=200_000_000), "max_position_embeddings=200000000"),
        (dict(intermediate_size=100_000_000_000), "intermediate_size"),
        (dict(num_hidden_layers=10_000, hidden_size=4096, num_attention_heads=32), "num_hidden_layers=10000"),
    ],
)
def test_a_model_too_large_is_refused_naming_the_field_estimate_and_limit(changes, field):
    config = ModelConfig.from_preset("gpt2-tiny", **changes)
    with pytest.raises(NanoseekError, match=field) as error:
        check_memory(config, "loading it", limit=8 << 30)
    message = str(error.value)
    assert "8.0 GiB available" in message and "needs about" in message and "\n" not in message


def test_a_model_that_fits_passes_and_reports_its_estimate():
    config = ModelConfig.from_preset("gpt2-tiny")
    assert check_memory(config, "loading it", limit=8 << 30) == estimate_bytes(config)["total"]


def test_batch_and_cache_parts_blame_the_flag_that_sets_them():
    config = ModelConfig.from_preset("gpt2-tiny")
    with pytest.raises(NanoseekError, match="--max-batch=100000000"):
        check_memory(
            config, "serving", kv_cache_tokens=10**8 * 256, kv_bytes_per_token=512, flag="--max-batch=100000000"
        )
    with pytest.raises(NanoseekError, match="train.batch_size"):
        check_memory(config, "training", 16, batch_tokens=10**12 * 128, flag="train.batch_size=1000000000000")


def test_the_limit_can_be_set_in_the_environment(monkeypatch):
    monkeypatch.setenv("NANOSEEK_MEMORY_LIMIT", "1000")
    with pytest.raises(NanoseekError, match="1000 B available"):
        check_memory(ModelConfig.from_preset("gpt2-tiny"), "loading it")
