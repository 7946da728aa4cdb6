"""DeepSeek-V4 attention (sliding / CSA / HCA with sinks), hash routing, clamped SwiGLU: numerics."""

import pytest
import torch
import torch.nn.functional as F

from nanoseek import ModelConfig, Transformer
from nanoseek.errors import NanoseekError
from nanoseek.model.attention import compressed
from nanoseek.model.attention.compressed import CompressedAttention, rotate_tail

KINDS = ["dense", "sliding", "csa", "hca"]


def v4(kinds, **overrides) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig.from_preset("deepseek-v4-tiny", sparse_layers=kinds, **overrides)
    model = Transformer(config).eval()
    with torch.no_grad():  # make the sinks and window position biases matter
        for name, p in model.named_parameters():
            if name.endswith(("sinks", "position_bias")):
                p.normal_(0, 0.5)
    return model


def ids(b=2, t=40, seed=1):
    return torch.randint(0, 128, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", KINDS)
def test_decode_and_chunked_prefill_equal_full_recompute(kind):
    model, x = v4([kind]), ids()
    with torch.no_grad():
        full = model(x).logits
        cache = model.make_cache(2, 64)
        steps = [model(x[:, :11], cache=cache).logits]
        steps += [model(x[:, p : p + 1], cache=cache, start=p).logits for p in range(11, 40)]
        assert (torch.cat(steps, 1) - full).abs().max() < 1e-5
        cache = model.make_cache(2, 64)
        chunks = [model(x[:, a:b], cache=cache, start=a).logits for a, b in ((0, 13), (13, 27), (27, 40))]
        assert (torch.cat(chunks, 1) - full).abs().max() < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_per_row_positions_equal_full_recompute(kind):
    """Continuous batching: rows at their own positions, windows closing at different steps."""
    model, x = v4([kind]), ids()
    with torch.no_grad():
        full = model(x).logits
        cache = model.make_cache(2, 64)
        model(x[:1, :9], cache=[c.rows(0, 1) for c in cache])
        model(x[1:, :15], cache=[c.rows(1, 2) for c in cache])
        pos = torch.tensor([9, 15])
        for _ in range(20):
            out = model(x[torch.arange(2), pos][:, None], cache=cache, start=pos.clone()).logits[:, 0]
            assert (out - full[torch.arange(2), pos]).abs().max() < 1e-5
            pos += 1


@pytest.mark.parametrize("kind", KINDS)
def test_causal(kind):
    model, x = v4([kind]), ids()
    y = x.clone()
    y[:, 25:] = (y[:, 25:] + 7) % 128
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    assert (a[:, :25] - b[:, :25]).abs().max() < 1e-6
    assert (a[:, 25:] - b[:, 25:]).abs().max() > 1e-4


def test_long_inputs_run_in_chunks_equal_one_pass(monkeypatch):
    model, x = v4(["csa", "hca"]), ids(1, 100)
    with torch.no_grad():
        one = model(x).logits
        monkeypatch.setattr(compressed, "CHUNK", 16)
        assert (model(x).logits - one).abs().max() < 1e-5


def test_wide_window_without_sinks_is_dense_causal_attention():
    config = ModelConfig.from_preset("deepseek-v4-tiny", sparse_layers=["sliding"], sliding_window=64)
    torch.manual_seed(0)
    layer = CompressedAttention(config, 0)
    with torch.no_grad():
        layer.sinks.fill_(-1e4)
    x = torch.randn(2, 30, config.hidden_size)
    b, t, h, hd = 2, 30, layer.n_heads, layer.head_dim
    cos, sin = layer.rope(torch.arange(t))
    q = compressed.unit_rms(layer.q_b_proj(layer.q_a_norm(layer.q_a_proj(x))).view(b, t, h, hd), layer.eps)
    q = rotate_tail(q, cos[:, None], sin[:, None]).transpose(1, 2)
    kv = rotate_tail(layer.kv_norm(layer.kv_proj(x)), cos, sin)[:, None]
    o = F.scaled_dot_product_attention(q, kv, kv, is_causal=True).transpose(1, 2)
    expected = layer.project_out(rotate_tail(o, cos[:, None], -sin[:, None]))
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def pooled_reference(c, raw_kv, raw_gate, m, overlap):
    """Entries by the formula, one window at a time (before norm and RoPE)."""
    d, out = c.dim, []
    for w in range(raw_kv.shape[1] // m):
        kv, gate = raw_kv[:, w * m : (w + 1) * m], raw_gate[:, w * m : (w + 1) * m] + c.position_bias
        if overlap:
            kv, gate = kv[..., d:], gate[..., d:]
            if w > 0:
                prev = slice((w - 1) * m, w * m)
                kv = torch.cat([raw_kv[:, prev, :d], kv], 1)
                gate = torch.cat([raw_gate[:, prev, :d] + c.position_bias[:, :d], gate], 1)
        out.append((kv * gate.softmax(1)).sum(1))
    return torch.stack(out, 1)


@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_compressor_pools_windows_by_the_formula(kind):
    layer = v4([kind]).layers[0].self_attn
    x = torch.randn(2, 27, 64)
    c, m = layer.compressor, layer.compressor.rate
    raw_kv, raw_gate = c.project(x)
    n = 27 // m
    got = c.pool(raw_kv, raw_gate, torch.arange(n), 0, layer.rope)
    ref = c.kv_norm(pooled_reference(c, raw_kv, raw_gate, m, kind == "csa"))
    cos, sin = layer.rope(torch.arange(n) * m)
    torch.testing.assert_close(got, rotate_tail(ref, cos, sin), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_compressor_pools_a_range_of_windows_as_it_gathers_them(kind):
    """Windows as a range (views of the projections, CSA's halves merged as softmax pieces) against the
    same windows gathered per row (a decode step's form) and the formula in float64: entries and the
    gradients of both projections, from window 0 and from a later window (a prefill after a cache)."""
    layer = v4([kind]).layers[0].self_attn.double()
    c, m = layer.compressor, layer.compressor.rate
    with torch.no_grad():
        c.position_bias.normal_()
    raw = [
        torch.randn(2, 7 * m + 3, r.shape[-1], dtype=torch.float64, requires_grad=True)
        for r in c.project(torch.randn(1, 1, 64).double())
    ]
    weight = torch.randn(2, 7, c.dim, dtype=torch.float64)
    for w0 in (0, 2):
        n = 7 - w0
        results = []
        for windows in (range(w0, 7), torch.arange(w0, 7), torch.arange(w0, 7).expand(2, -1)):
            got = c.pool(*raw, windows, 0, layer.rope)
            results.append([got, *torch.autograd.grad((got * weight[:, :n]).sum(), raw)])
        for got in results[1:]:
            for a, b in zip(got, results[0]):
                torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
        ref = c.kv_norm(pooled_reference(c, *raw, m, kind == "csa"))[:, w0:]
        cos, sin = layer.rope(torch.arange(w0, 7) * m)
        torch.testing.assert_close(results[0][0], rotate_tail(ref, cos, sin), atol=1e-12, rtol=1e-12)


def test_csa_top_k_covering_every_entry_equals_attending_all_of_them():
    model, x = v4(["csa"], index_topk=64), ids()
    with torch.no_grad():
        picked = model(x).logits
        model.set_dsa_warmup(True)  # warm-up attends every visible entry
        assert (model(x).logits - picked).abs().max() < 1e-6
    narrow = v4(["csa"], index_topk=2)
    with torch.no_grad():
        assert (narrow(x).logits - picked).abs().max() > 1e-4  # fewer entries: a different output


def test_csa_inference_skips_the_indexer_when_top_k_covers_every_entry(monkeypatch):
    model, x = v4(["csa"], index_topk=64), ids()  # 40 tokens: at most 10 entries at rate 4
    with torch.no_grad():
        model.train()  # the training path scores and picks (all of them)
        scored = model(x).logits
        model.eval()
        layer = next(m for m in model.modules() if isinstance(m, CompressedAttention) and m.indexer is not None)
        monkeypatch.setattr(layer.indexer, "scores", lambda *a, **k: pytest.fail("indexer ran"))
        torch.testing.assert_close(model(x).logits, scored, atol=1e-6, rtol=1e-6)


def test_gradients_reach_every_parameter_and_the_indexer_learns_by_kl():
    model = v4(["csa", "hca"]).train()
    x = ids()
    out = model(x, targets=x)
    assert "index_loss" in out.aux and out.aux["index_loss"] > 0
    (out.loss + out.aux["index_loss"]).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_hash_routing_uses_the_token_table_and_sqrt_softplus_weights():
    model = v4(["csa", "hca"])
    moe = model.layers[0].mlp
    assert moe.gate.hash_routing and not model.layers[1].mlp.gate.hash_routing
    x = torch.randn(6, 64)
    tokens = torch.tensor([3, 5, 3, 9, 1, 0])
    idx, w, scores = moe.gate(x, tokens)
    assert torch.equal(idx, moe.gate.tid2eid[tokens])
    s = F.softplus(x @ moe.gate.weight.T).sqrt()
    expected = s.gather(1, idx)
    torch.testing.assert_close(w, expected / expected.sum(-1, keepdim=True) * 1.5)
    with pytest.raises(ValueError, match="token ids"):
        moe.gate(x)


def test_swiglu_clamp():
    from nanoseek.model.ffn import swiglu

    gate, up = torch.tensor([20.0, -3.0]), torch.tensor([-30.0, 2.0])
    torch.testing.assert_close(swiglu(gate, up, 10.0), F.silu(torch.tensor([10.0, -3.0])) * torch.tensor([-10.0, 2.0]))


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(attention="mla", sparse_layers=["csa"], kv_lora_rank=16, qk_nope_head_dim=8, v_head_dim=8),
            "attention='v4'",
        ),
        (dict(o_groups=3), "o_groups"),
        (dict(num_key_value_heads=2), "one shared"),
        (dict(compress_rate_csa=1), "compress_rate_csa"),
        (dict(sparse_layers=["nsa"]), "dense, sliding, csa, hca"),
    ],
)
def test_bad_v4_configs_name_the_field(change, message):
    with pytest.raises(NanoseekError, match=message):
        ModelConfig.from_preset("deepseek-v4-tiny", **change)


def test_trains_and_loss_falls():
    model = v4(["csa", "hca"]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = ids(4, 33)
    losses = []
    for _ in range(15):
        out = model(x[:, :-1], targets=x[:, 1:])
        (out.loss + out.aux["index_loss"]).backward()
        opt.step()
        opt.zero_grad()
        model.update_balance_bias(out.expert_load)
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_earliest_topk_breaks_ties_by_position():
    from nanoseek.model.attention.compressed import earliest_topk

    s = torch.tensor([[0.5, 0.0, -0.0, 0.0, -1.0, float("-inf"), 2.0, 0.5]])
    assert sorted(earliest_topk(s, 5).tolist()[0]) == [0, 1, 2, 6, 7]
    x = torch.randn(4, 64).round(decimals=1)
    expected = x.sort(dim=-1, descending=True, stable=True).indices[:, :9]
    assert torch.equal(earliest_topk(x, 9).sort(dim=-1).values, expected.sort(dim=-1).values)


@pytest.mark.parametrize("kind", ["csa", "hca", "sliding"])
def test_attention_map_rebuilds_the_layer_output(kind):
    layer = v4([kind]).layers[0].self_attn
    x = torch.randn(1, 30, 64)
    weights, allowed = layer.attention_map(x)
    n_entries = 0 if kind == "sliding" else 30 // layer.compressor.rate
    assert weights.shape == (1, 4, 30, 30 + n_entries) and (weights[0][:, ~allowed[0]] == 0).all()
    if kind == "csa":
        assert allowed[0, :, 30:].sum(-1).max() == 4  # the indexer's top-4
    cos, sin = layer.rope(torch.arange(30))
    keys = rotate_tail(layer.kv_norm(layer.kv_proj(x)), cos, sin)
    if n_entries:
        keys = torch.cat([keys, layer.compressed_entries(x, None, 0, 30)[0]], 1)
    o = (weights @ keys[:, None]).transpose(1, 2)
    with torch.no_grad():
        expected = layer(x)
    torch.testing.assert_close(
        layer.project_out(rotate_tail(o, cos[:, None], -sin[:, None])), expected, atol=1e-5, rtol=1e-5
    )


def test_deepseek_v4_flash_counts_and_cache_estimate():
    from nanoseek.model.transformer import kv_cache_bytes_per_token, model_info

    info = model_info(ModelConfig.from_preset("deepseek-v4-flash"))
    # DeepSeek-V4-Flash is published as 284B parameters, 13B activated
    assert 283e9 < info["params_total"] < 285e9 and 13.0e9 < info["params_active_non_embedding"] < 13.5e9
    model = v4(["csa", "hca"])
    cache = model.make_cache(1, 64)
    held = sum(b[0].numel() for c in cache for b in c.buffers.values())  # numbers for 64 positions
    assert kv_cache_bytes_per_token(model.config, dtype_bytes=1) * 64 == pytest.approx(held, rel=0.02)


def test_checkpointed_hash_layers_recompute_with_their_own_token_ids():
    plain, ckpt = v4(["csa", "hca"]).train(), v4(["csa", "hca"]).train()
    ckpt.gradient_checkpointing = True
    x1, x2 = ids(2, 24, seed=1), ids(2, 24, seed=2)
    plain(x1, targets=x1).loss.backward()
    out = ckpt(x1, targets=x1)
    ckpt(x2, targets=x2)  # a later forward hands other ids to the hash layers
    out.loss.backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_per_row_decode_with_a_cache_shorter_than_a_window():
    model, x = v4(["hca"]), ids(2, 6)  # HCA rate 8 > 6 positions
    with torch.no_grad():
        full = model(x).logits
        cache = model.make_cache(2, 6)
        model(x[:, :3], cache=cache)
        out = model(x[:, 3:4], cache=cache, start=torch.tensor([3, 3])).logits
    assert (out[:, 0] - full[:, 3]).abs().max() < 1e-5


def test_hf_export_routing_rules(tmp_path):
    from nanoseek.io.hf import config_to_hf

    cfg = ModelConfig.from_preset("deepseek-v4-tiny")
    assert config_to_hf(cfg.replace(scoring_func="sigmoid"))["scoring_func"] == "sigmoid"
    for bad in (dict(scoring_func="softmax"), dict(norm_topk_prob=False), dict(sparse_layers=["dense"])):
        with pytest.raises(NanoseekError, match="cannot save in HF format"):
            config_to_hf(cfg.replace(**bad))
