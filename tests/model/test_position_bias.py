"""ALiBi and T5 relative-bias positions: slopes, buckets, the bias in attention, cached decode, gradients."""

import math

import pytest
import torch

from nanoseek.config import ModelConfig
from nanoseek.errors import NanoseekError
from nanoseek.model.attention.core import allowed_keys, attention_probs, causal_attention
from nanoseek.model.position import ALiBi, alibi_slopes, t5_buckets
from nanoseek.model.transformer import Transformer


def tiny(position: str, **kw) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, intermediate_size=64)
    base.update(kw)
    return ModelConfig(position=position, **base)


def test_alibi_slopes_power_of_two_are_the_geometric_sequence():
    assert alibi_slopes(8).tolist() == [2.0 ** -(i + 1) for i in range(8)]


def test_alibi_slopes_for_six_heads_follow_the_paper():
    # the 4 slopes of H=4 (2^-2, 2^-4, 2^-6, 2^-8), then every other slope of H=8 (2^-0.5 .. ): the first two
    expected = [2**-2, 2**-4, 2**-6, 2**-8, 2**-1.0, 2**-3.0]
    assert alibi_slopes(6).tolist() == pytest.approx(expected)
    expected12 = [2.0 ** (-(i + 1)) for i in range(8)] + [2.0 ** (-0.5 * (2 * i + 1)) for i in range(4)]
    assert alibi_slopes(12).tolist() == pytest.approx(expected12)


def test_t5_buckets_exact_then_logarithmic():
    n = torch.tensor([0, 1, 15, 16, 127, 128, 10_000, -5])
    buckets = t5_buckets(n, 32, 128).tolist()
    assert buckets[:3] == [0, 1, 15]  # exact below num_buckets / 2
    assert buckets[3] == 16 + int(math.log(16 / 16) / math.log(128 / 16) * 16)
    assert buckets[4] == 16 + int(math.log(127 / 16) / math.log(8) * 16)
    assert buckets[5:7] == [31, 31] and buckets[7] == 0


def reference(q, k, v, bias_HTS, window=None):
    t = q.shape[-2]
    probs = attention_probs(q, k, allowed_keys(t, window)[None, None], q.shape[-1] ** -0.5, bias_HTS)
    return probs @ v.repeat_interleave(q.shape[1] // k.shape[1], dim=1)


@pytest.mark.parametrize("window", [None, 5])
def test_alibi_attention_matches_explicit_softmax(window):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 23, 8), torch.randn(2, 3, 23, 8), torch.randn(2, 3, 23, 8)
    alibi = ALiBi(tiny("alibi"))
    dist = torch.arange(23)[:, None] - torch.arange(23)
    out = causal_attention(q, k, v, 0, 8**-0.5, window=window, bias=alibi)
    torch.testing.assert_close(out, reference(q, k, v, alibi(dist), window), atol=1e-5, rtol=1e-5)


def test_banded_bias_from_a_later_start_matches_explicit_softmax(monkeypatch):
    import nanoseek.model.attention.core as core

    monkeypatch.setattr(core, "BAND_CHUNK", 4)  # several chunks, early ones included
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 6, 30, 8), torch.randn(1, 6, 30, 8), torch.randn(1, 6, 30, 8)
    alibi = ALiBi(tiny("alibi"))
    out = causal_attention(q[:, :, 10:], k, v, 10, 8**-0.5, window=7, bias=alibi)
    full = reference(q, k, v, alibi(torch.arange(30)[:, None] - torch.arange(30)), 7)
    torch.testing.assert_close(out, full[:, :, 10:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position,extra", [("alibi", {}), ("t5", {}), ("alibi", {"sparse": "sliding"})])
def test_cached_decode_equals_recompute(position, extra):
    torch.manual_seed(0)
    cfg = tiny(position, attention="gqa", num_key_value_heads=2, sliding_window=4, **extra)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.make_cache(2, 16)
        steps = [model(ids[:, :5], cache=cache, start=0).logits]
        steps += [model(ids[:, i : i + 1], cache=cache, start=i).logits for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


def test_per_row_decode_positions_match_recompute():
    torch.manual_seed(0)
    model = Transformer(tiny("t5")).eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        cache = model.make_cache(2, 16)
        model(ids[:, :8], cache=cache, start=0)
        step = model(ids[:, 8:9], cache=cache, start=torch.tensor([8, 8])).logits
        torch.testing.assert_close(step[:, 0], model(ids).logits[:, -1], atol=1e-4, rtol=1e-4)


def test_gradients_reach_the_t5_bias_table():
    torch.manual_seed(0)
    model = Transformer(tiny("t5", relative_attention_num_buckets=8, relative_attention_max_distance=16))
    ids = torch.randint(0, 64, (2, 20))
    model(ids, targets=ids).loss.backward()
    grad = model.position_bias.relative_attention_bias.weight.grad
    assert grad is not None and bool((grad.abs().sum(-1) > 0).all())  # every bucket is used at 20 tokens


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"sparse": "nsa"}, "dense and sliding"),
        ({"attention": "mla", "q_lora_rank": 16, "kv_lora_rank": 16}, "attention='mla' needs position='rope'"),
        ({"relative_attention_num_buckets": 8, "relative_attention_max_distance": 4}, "max_distance"),
    ],
)
def test_bias_positions_refuse_what_they_do_not_fit(kw, match):
    with pytest.raises(NanoseekError, match=match):
        tiny("t5", **kw)


def test_attention_map_includes_the_bias():
    torch.manual_seed(0)
    model = Transformer(tiny("alibi")).eval()
    attn, x = model.layers[0].self_attn, torch.randn(1, 6, 48)
    with_bias, _ = attn.attention_map(x, model.position_bias)
    plain, _ = attn.attention_map(x)
    torch.testing.assert_close(with_bias.sum(-1), torch.ones(1, 6, 6))
    assert not torch.allclose(with_bias, plain)


def test_t5_buckets_match_transformers_causal_buckets():
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    query, key = torch.arange(300)[:, None], torch.arange(300)[None, :]
    theirs = t5.T5Attention._relative_position_bucket(
        key - query, bidirectional=False, num_buckets=32, max_distance=128
    )
    torch.testing.assert_close(t5_buckets(query - key, 32, 128), theirs)
