"""Sparse attention: sliding window and DSA reduce to dense where they must, stay causal, train,
and decode from the cache exactly as a full recompute."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from nanoseek import ModelConfig, NanoseekError, Transformer
from nanoseek.generation.loop import generate
from nanoseek.model.attention import core as attention
from nanoseek.model.attention.core import causal_attention


def model(preset: str, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset(preset, **overrides)).eval()


def same_weights(src: Transformer, preset: str, **overrides) -> Transformer:
    dst = model(preset, **overrides)
    missing, _ = dst.load_state_dict(src.state_dict(), strict=False)  # src may have more (the indexer)
    assert not missing
    return dst


def tokens(t: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 100, (batch, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- sliding window


def reference_window(q, k, v, window):
    t = q.shape[-2]
    pos = torch.arange(t)
    mask = (pos[None] <= pos[:, None]) & (pos[None] > pos[:, None] - window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("t,window", [(600, 100), (300, 1), (257, 256)])
def test_banded_attention_equals_the_masked_dense_reference(t, window):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4 if i == 0 else 2, t, 16, generator=g) for i in range(3))
    got = causal_attention(q, k, v, 0, window=window)
    torch.testing.assert_close(got, reference_window(q, k, v, window), atol=1e-5, rtol=1e-5)
    assert t > attention.BAND_CHUNK or window == 256  # more than one chunk of queries


def test_bands_clear_of_position_0_share_one_mask(monkeypatch):
    """Only chunks whose band reaches before position 0 need a mask of their own; the rest share
    one (C, C + w - 1) mask (a per-chunk mask there cost 50 ms of mask conversion at 16K)."""
    masks = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kwargs):
        masks.append(None if attn_mask is None else attn_mask.shape)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    q, k, v = (torch.randn(1, 2, 1100, 8) for _ in range(3))
    causal_attention(q, k, v, 0, window=300)  # the first 300 queries: one causal call; then bands
    assert masks == [None, (attention.BAND_CHUNK, attention.BAND_CHUNK + 299)]
    masks.clear()
    causal_attention(q[:, :, -400:], k, v, 700, window=300)  # after a prefix: no band reaches position 0
    assert masks == [(attention.BAND_CHUNK, attention.BAND_CHUNK + 299)]


@pytest.mark.parametrize("start,t,window", [(0, 600, 100), (37, 300, 50), (500, 270, 300), (3, 1500, 700)])
def test_banded_attention_after_a_prefix_and_its_gradients(start, t, window):
    """Queries at positions start..start+t-1 against start + t keys (prefill after a cached
    prefix), forward and gradients, against the explicitly masked reference."""
    g = torch.Generator().manual_seed(1)
    s = start + t
    q = torch.randn(2, 4, t, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, s, 16, generator=g, requires_grad=True) for _ in range(2))
    qp, kp = torch.arange(start, s)[:, None], torch.arange(s)[None]
    mask = (kp <= qp) & (kp > qp - window)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = causal_attention(q, k, v, start, window=window)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(got)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for a, e in zip(torch.autograd.grad(got, (q, k, v), grad), want):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["llama-tiny", "deepseek-v3-tiny"])
def test_window_at_least_t_is_dense(preset):
    dense = model(preset)
    sliding = same_weights(dense, preset, sparse="sliding", sliding_window=48)
    x = tokens(48)
    torch.testing.assert_close(sliding(x).logits, dense(x).logits, atol=0, rtol=0)


@pytest.mark.parametrize("preset", ["llama-tiny", "deepseek-v3-tiny", "gpt2-tiny"])
def test_sliding_is_causal_local_and_trains(preset):
    m = model(preset, sparse="sliding", sliding_window=4)
    x = tokens(20)
    y = x.clone()
    y[:, 12:] = (y[:, 12:] + 1) % 100  # change the future: positions < 12 must not move
    torch.testing.assert_close(m(x).logits[:, :12], m(y).logits[:, :12], atol=0, rtol=0)
    m.train()
    out = m(x, targets=x)
    (out.loss + sum(out.aux.values())).backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == [], no_grad


def test_one_layer_window_ignores_keys_outside_it():
    m = model("llama-tiny", num_hidden_layers=1, sparse="sliding", sliding_window=3)
    x = tokens(10)
    y = x.clone()
    y[:, 2] = (y[:, 2] + 1) % 100  # position 9 sees 7, 8, 9 only
    assert torch.equal(m(x).logits[:, 9], m(y).logits[:, 9])
    assert not torch.equal(m(x).logits[:, 4], m(y).logits[:, 4])


@pytest.mark.parametrize(
    "preset,overrides",
    [
        ("llama-tiny", dict(sparse="sliding", sliding_window=5)),
        ("deepseek-v3-tiny", dict(sparse_layers=["sliding", "dense"], sliding_window=6)),
        ("deepseek-v32-tiny", dict(index_topk=5)),
        ("deepseek-v32-tiny", dict(sparse_layers=["dsa", "sliding"], index_topk=6, sliding_window=7)),
    ],
)
def test_cached_decode_equals_full_recompute(preset, overrides):
    m = model(preset, **overrides)
    prompt = tokens(9, batch=1)[0]
    new = generate(m, prompt, max_new_tokens=20, temperature=0)
    full = torch.cat([prompt, new])
    logits = m(full[None]).logits[0, len(prompt) - 1 : -1]
    assert torch.equal(logits.argmax(-1), new)


def test_bad_sparse_config_names_the_field():
    with pytest.raises(NanoseekError, match="sparse_layers\\[1\\]"):
        ModelConfig.from_preset("llama-tiny", sparse_layers=["sliding", "nope"])
    with pytest.raises(NanoseekError, match="sliding_window"):
        ModelConfig.from_preset("llama-tiny", sparse="sliding", sliding_window=0)
    with pytest.raises(NanoseekError, match="needs attention='mla'"):
        ModelConfig.from_preset("llama-tiny", sparse="dsa")


# ---------------------------------------------------------------------------- DSA


def test_dsa_with_topk_at_least_t_is_dense_mla():
    sparse = model("deepseek-v32-tiny", index_topk=64)
    dense = same_weights(sparse, "deepseek-v3-tiny")
    x = tokens(40)
    torch.testing.assert_close(sparse(x).logits, dense(x).logits, atol=0, rtol=0)


def brute_force_keep(attn, x, rope_all, t):
    """Per query, the top-k causal keys by the indexer score, chosen one query at a time."""
    with torch.no_grad():
        q_latent = attn.q_a_layernorm(attn.q_a_proj(x))
        keys = attn.indexer.keys(x, rope_all)
        scores = attn.indexer.scores(x, q_latent, keys, rope_all)
    keep = torch.zeros(x.shape[0], t, t, dtype=torch.bool)
    for b in range(x.shape[0]):
        for i in range(t):
            picked = scores[b, i, : i + 1].topk(min(attn.indexer.topk, i + 1)).indices
            keep[b, i, picked] = True
    return keep


def test_dsa_attends_only_to_the_selected_keys():
    m = model("deepseek-v32-tiny", index_topk=4, num_hidden_layers=1, index_n_heads=16)  # 16 heads: no ReLU ties
    attn = m.layers[0].self_attn
    x = torch.randn(2, 12, m.config.hidden_size)
    rope = m.rope(0, 12, x.device)
    keep = brute_force_keep(attn, x, rope, 12)
    assert keep.sum(-1).max() == 4 and keep.sum(-1).min() == 1
    got = attn(x, rope)
    # the same layer, its selection replaced by the brute-force one
    attn.indexer.select = lambda scores, causal: keep
    torch.testing.assert_close(got, attn(x, rope), atol=0, rtol=0)
    # and a genuinely different result from dense attention
    attn.indexer.select = lambda scores, causal: causal
    assert not torch.allclose(got, attn(x, rope), atol=1e-4)


@pytest.mark.parametrize("k", [1, 3, 17, 63])
def test_earliest_topk_fast_path_picks_the_keyed_set(k):
    """The eager float top-k (with its redone tied rows) and the int64-keyed one give the same set,
    on scores full of ties (rounded, ReLU zeros, -0.0, -inf masks) and rows with fewer than k finite."""
    from nanoseek.model.attention.dsa import earliest_topk, earliest_topk_keyed

    g = torch.Generator().manual_seed(k)
    scores = torch.randn(3, 40, 64, generator=g).round(decimals=1).relu()
    scores[0, :, ::7] = -0.0
    scores = scores.masked_fill(torch.rand(3, 40, 64, generator=g) < 0.3, float("-inf"))
    scores[1, :5] = float("-inf")  # rows with no finite score at all
    fast, keyed = earliest_topk(scores, k), earliest_topk_keyed(scores, k)
    assert torch.equal(fast.sort(-1).values, keyed.sort(-1).values)


def test_dsa_picks_do_not_depend_on_the_keys_after_a_query():
    """Ties among the indexer's ReLU scores go to the earliest key: a prefix's logits equal the
    longer pass's first positions exactly (with plain top-k they differed by ~0.1 from 15 tokens on)."""
    m = model("deepseek-v32-tiny", index_topk=3)
    x = tokens(24)
    with torch.no_grad():
        full = m(x).logits
        for t in (5, 9, 15, 16, 20):
            torch.testing.assert_close(m(x[:, :t]).logits, full[:, :t], atol=1e-5, rtol=1e-5)


def test_dsa_is_causal_and_every_parameter_gets_a_gradient():
    m = model("deepseek-v32-tiny", index_topk=4)
    x = tokens(24)
    y = x.clone()
    y[:, 15:] = (y[:, 15:] + 1) % 100
    torch.testing.assert_close(m(x).logits[:, :15], m(y).logits[:, :15], atol=0, rtol=0)
    m.train()
    out = m(x, targets=x)
    (out.loss + sum(out.aux.values())).backward()
    names = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert names == [], names
    assert "index_loss" in out.aux and out.aux["index_loss"] >= 0


def test_dsa_warmup_trains_only_the_indexer_and_lowers_its_loss():
    m = model("deepseek-v32-tiny", index_topk=4).train()
    m.set_dsa_warmup(True)
    x = tokens(32, batch=4)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.Adam([p for n, p in m.named_parameters() if "indexer" in n], lr=1e-2)
    losses = []
    for _ in range(30):
        out = m(x, targets=x)
        total = out.loss + sum(v for v in out.aux.values() if v.requires_grad)
        opt.zero_grad()
        total.backward()
        assert all(p.grad is None for n, p in m.named_parameters() if "indexer" not in n)
        opt.step()
        losses.append(out.aux["index_loss"].item())
    assert losses[-1] < 0.5 * losses[0]
    changed = [n for n, p in m.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all("indexer" in n for n in changed)


@pytest.mark.parametrize("topk,gather_from", [(16, 10_000), (16, 1), (280, 10_000)])
def test_long_prefill_path_equals_the_masked_path(monkeypatch, topk, gather_from):
    """300 queries > SELECT_CHUNK: chunks that mask their picks, that gather them (gather_from=1), or
    (top-k 280) a first chunk that sees fewer keys than top-k and keeps every causal key."""
    import nanoseek.model.attention.dsa as dsa

    monkeypatch.setattr(dsa, "GATHER_FROM", gather_from)
    # the reference path (kernels off; tests/kernels checks the fast one against it); 16 heads: no ReLU ties
    m = model("deepseek-v32-tiny", index_topk=topk, index_n_heads=16, max_position_embeddings=512, kernels=False)
    x = tokens(300, batch=1)
    assert 300 > dsa.SELECT_CHUNK
    with torch.no_grad():
        chunked = m(x).logits
        for attn in m.dsa_layers():
            attn.long_prefill = 10_000
        masked = m(x).logits
    torch.testing.assert_close(chunked, masked, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------- inspect attention


@pytest.mark.parametrize(
    "preset,overrides,kind",
    [
        ("llama-tiny", dict(sparse="sliding", sliding_window=4), "sliding"),
        ("deepseek-v32-tiny", dict(index_topk=5, index_n_heads=16), "dsa"),
        ("deepseek-v3-tiny", {}, "dense"),
    ],
)
def test_attention_map_is_what_the_layer_computes(preset, overrides, kind):
    from nanoseek.analysis import attention_maps

    m = model(preset, **overrides)
    x = tokens(14, batch=1)
    weights, allowed, got_kind = attention_maps(m, x, layer=0)
    assert got_kind == kind and weights.shape == allowed.shape == (14, 14)
    torch.testing.assert_close(weights.sum(-1), torch.ones(14))
    assert (weights[~allowed] == 0).all()
    expected_per_row = {
        "sliding": torch.arange(14).clamp(max=3) + 1,
        "dsa": torch.arange(14).clamp(max=4) + 1,
        "dense": torch.arange(14) + 1,
    }[kind]
    assert torch.equal(allowed.sum(-1), expected_per_row)
    if kind == "sliding":  # rebuild the layer's output from the map: softmax weights times values
        attn = m.layers[0].self_attn
        h = m.layers[0].input_layernorm(m.embed(x))
        rope = m.rope(0, 14, x.device)
        full, _ = attn.attention_map(h, rope)
        hd = attn.head_dim
        v = attn.qkv_proj(h)[..., (attn.n_heads + attn.n_kv_heads) * hd :].view(1, 14, attn.n_kv_heads, hd)
        v = v.transpose(1, 2).repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)
        y = (full @ v).transpose(1, 2).reshape(1, 14, -1)
        torch.testing.assert_close(attn.o_proj(y), attn(h, rope), atol=1e-5, rtol=1e-5)


def test_inspect_attention_command_writes_a_png(tmp_path, capsys):
    import json

    from nanoseek.cli import main
    from nanoseek.data.tokenizer import CharTokenizer

    tok = CharTokenizer.train(["abcdefgh ijklmnop"])
    m = model("deepseek-v32-tiny", vocab_size=tok.vocab_size, index_topk=4)
    m.save_pretrained(tmp_path / "ckpt")
    tok.save(tmp_path / "ckpt")
    out = tmp_path / "attn.png"
    assert (
        main(
            [
                "inspect",
                "attention",
                str(tmp_path / "ckpt"),
                "--prompt",
                "abc defg hij",
                "--layer",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert out.stat().st_size > 5000
    assert json.loads(capsys.readouterr().out)["kind"] == "dsa"
    assert main(["inspect", "attention", str(tmp_path / "ckpt"), "--prompt", "abc", "--layer", "7"]) == 2


# ---------------------------------------------------------------------------- NSA


def masked_softmax_attention(attn, q, k, v, allowed_BGTS):
    """The reference: explicit softmax over the allowed keys of each KV group, its heads repeated."""
    rep = attn.n_heads // attn.n_kv_heads
    logits = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * attn.scale
    probs = logits.masked_fill(~allowed_BGTS.repeat_interleave(rep, 1), float("-inf")).softmax(-1)
    return probs @ v.repeat_interleave(rep, 1)


def nsa_model(**overrides):
    return model("llama-tiny", **{"sparse": "nsa", "nsa_block": 4, "nsa_topn": 3, "sliding_window": 6, **overrides})


def test_nsa_selected_branch_with_every_block_is_causal_attention():
    m = nsa_model(nsa_topn=64)  # more blocks than a 40-token sequence has: every block selected
    attn = m.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, attn.n_heads, 40, attn.head_dim, generator=g)
    k, v = (torch.randn(2, attn.n_kv_heads, 40, attn.head_dim, generator=g) for _ in range(2))
    _, p_cmp = attn.compressed_attention(q, attn.compress(k), attn.compress(v, values=True), 0)
    got = attn.selected_attention(q, k, v, p_cmp, 0)
    torch.testing.assert_close(got, causal_attention(q, k, v, 0, attn.scale), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("start,t", [(0, 40), (6, 33), (37, 1)])
def test_nsa_selected_branch_attends_exactly_to_the_picked_blocks(start, t):
    # 5 of up to 10 blocks per query block: the first ones miss picks (own masks), the rest share one mask
    m = nsa_model(nsa_topn=5)
    attn = m.layers[0].self_attn
    g = torch.Generator().manual_seed(1)
    s = start + t
    q = torch.randn(2, attn.n_heads, t, attn.head_dim, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, attn.n_kv_heads, s, attn.head_dim, generator=g, dtype=torch.float64) for _ in range(2))
    attn.double()
    _, p_cmp = attn.compressed_attention(q, attn.compress(k), attn.compress(v, values=True), start)
    got = attn.selected_attention(q, k, v, p_cmp, start)
    l, first = attn.block, start // 4
    blocks, valid = attn.pick_blocks(p_cmp, first, (s - 1) // l - first + 1)
    chosen = torch.zeros(2, attn.n_kv_heads, blocks.shape[2], s // l + 2, dtype=torch.bool)
    chosen.scatter_(-1, blocks.masked_fill(~valid, s // l + 1), True)  # invalid picks: a spare column
    query_block = torch.arange(start, s) // l - first
    key_block = torch.arange(s) // l
    allowed = chosen[:, :, query_block][..., key_block] & (torch.arange(s) <= torch.arange(start, s)[:, None])
    torch.testing.assert_close(got, masked_softmax_attention(attn, q, k, v, allowed))


def test_nsa_compressed_branch_sees_only_complete_past_blocks():
    m = nsa_model()
    attn = m.layers[0].self_attn
    q = torch.randn(1, attn.n_heads, 12, attn.head_dim)
    kb = torch.randn(1, attn.n_kv_heads, 3, attn.head_dim)
    out, scores = attn.compressed_attention(q, kb, kb, 0)
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))  # nothing complete before position 3
    # query block 0 (positions 0..3): only position 3 sees block 0; query block 1 (4..7) sees blocks 0
    # and, at position 7, block 1; block 2 is complete only at position 11
    assert scores.shape == (1, attn.n_kv_heads, 3, 3)
    per_group = attn.n_heads // attn.n_kv_heads
    torch.testing.assert_close(scores.sum(-1), torch.tensor([[1.0, 4.0, 4.0]]).mul(per_group).expand(1, 2, 3))
    assert (scores[:, :, 0, 1:] == 0).all() and (scores[:, :, 1, 2:] == 0).all()
    assert (scores[:, :, 1, 1] > 0).all() and (scores[:, :, 2, 2] > 0).all()


@pytest.mark.parametrize("start,t", [(0, 23), (6, 11), (9, 1)])
def test_nsa_compressed_block_attention_matches_masked_softmax_with_gradients(start, t):
    from nanoseek.model.attention import nsa

    g = torch.Generator().manual_seed(0)
    l, n, heads, groups = 4, (start + t) // 4, 6, 2
    q = torch.randn(2, heads, t, 5, generator=g, dtype=torch.float64, requires_grad=True)
    kb, vb = (torch.randn(2, groups, n, w, generator=g, dtype=torch.float64, requires_grad=True) for w in (5, 3))
    out, probs = nsa.compressed_block_attention(q, kb, vb, start, l, 0.4)
    # explicit masked softmax over the blocks complete at each query (none: output 0)
    visible = nsa.visible_blocks(start, t, l, n, None)
    logits = q.unflatten(1, (groups, -1)) @ kb[:, :, None].transpose(-1, -2) * 0.4
    ref_p = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    ref_out = (ref_p @ vb[:, :, None]).flatten(1, 2)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(probs, ref_p.sum(2).float())
    assert (out[:, :, : max(0, l - 1 - start)] == 0).all()
    w = torch.randn_like(out)
    got = torch.autograd.grad((out * w).sum(), (q, kb, vb))
    want = torch.autograd.grad((ref_out * w).sum(), (q, kb, vb))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_nsa_is_causal_trains_and_every_parameter_gets_a_gradient():
    m = nsa_model()
    x = tokens(30)
    y = x.clone()
    y[:, 17:] = (y[:, 17:] + 1) % 100
    torch.testing.assert_close(m(x).logits[:, :17], m(y).logits[:, :17], atol=0, rtol=0)
    m.train()
    out = m(x, targets=x)
    out.loss.backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == [], no_grad


@pytest.mark.parametrize("overrides", [{}, {"sparse_layers": ["nsa", "sliding"]}, {"nsa_topn": 5}])
def test_nsa_cached_decode_equals_full_recompute(overrides):
    m = nsa_model(**overrides)
    prompt = tokens(9, batch=1)[0]
    new = generate(m, prompt, max_new_tokens=20, temperature=0)
    full = torch.cat([prompt, new])
    assert torch.equal(m(full[None]).logits[0, len(prompt) - 1 : -1].argmax(-1), new)


def test_nsa_chunked_prefill_and_decode_equal_full_recompute():
    """Every block selected (so the CPU form's per-query-block selection cannot differ between
    chunkings): chunks that start and end inside blocks and span several, then one token at a
    time — the cached block summaries give the full forward's logits."""
    m = nsa_model(nsa_topn=64)
    x = tokens(40)
    with torch.no_grad():
        full = m(x).logits
        cache = m.make_cache(2, 48)
        chunks = [m(x[:, a:b], cache=cache, start=a).logits for a, b in ((0, 13), (13, 27), (27, 33))]
        steps = [m(x[:, p : p + 1], cache=cache, start=p).logits for p in range(33, 40)]
    torch.testing.assert_close(torch.cat(chunks + steps, 1), full, atol=1e-5, rtol=1e-5)


def test_nsa_speculative_decoding_rewrites_rejected_blocks():
    """Speculative decoding writes drafts that may be rejected, some completing a block; the
    block is compressed again when its last position is rewritten, so the tokens equal greedy's."""
    from nanoseek.generation.speculative import speculative_generate

    m = nsa_model(nsa_topn=64, num_nextn_predict_layers=1)
    prompt = tokens(9, batch=1)[0].tolist()
    for n in (1, 2, 7, 16):
        fast, _ = speculative_generate(m, prompt, max_new_tokens=n)
        assert fast.tolist() == generate(m, prompt, max_new_tokens=n, temperature=0).tolist()


def test_nsa_decode_at_per_row_positions_equals_one_row_at_a_time():
    """The tensor-position decode step (compiled decoding, batched serving) against the int-position
    path row by row, after each row's own prefill: top-k picks among several complete blocks, a row
    before any complete block, a prefill that ends on a block boundary (16), a token that completes
    a block (position 31, blocks of 4), and a
    cache that ends in a partial block (38 positions). The caches' block summaries must equal a
    fresh compression of their keys and values."""
    m = nsa_model(nsa_topn=5, num_key_value_heads=2)
    attn = m.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    cache, reference = (attn.make_cache(4, 38, torch.float32, "cpu") for _ in range(2))
    positions = torch.tensor([2, 16, 31, 37])  # prefills of 2, 16, 31, 37 tokens
    with torch.no_grad():
        for i, p in enumerate(positions.tolist()):
            prompt = torch.randn(1, p, m.config.hidden_size, generator=g)
            for c in (cache, reference):
                attn(prompt, None, c.rows(i, i + 1), 0)
        x = torch.randn(4, 1, m.config.hidden_size, generator=g)
        got = attn(x, None, cache, positions)
        rows = [attn(x[i : i + 1], None, reference.rows(i, i + 1), int(p)) for i, p in enumerate(positions)]
    torch.testing.assert_close(got, torch.cat(rows), atol=1e-5, rtol=1e-5)
    close = functools.partial(torch.testing.assert_close, atol=1e-6, rtol=1e-6)
    for c, r in zip(cache.caches, reference.caches):
        close(c.k, r.k)
        close(c.v, r.v)
    for c, r in zip(cache.blocks, reference.blocks):
        close(c, r)
    k_cmp, v_cmp = cache.caches[0].k, cache.caches[0].v
    for i, p in enumerate(positions.tolist()):  # blocks complete after position p: (p + 1) // 4
        n = (p + 1) // 4
        close(cache.blocks[0][i, :, :n], attn.compress(k_cmp[i : i + 1, :, : 4 * n])[0])
        close(cache.blocks[1][i, :, :n], attn.compress(v_cmp[i : i + 1, :, : 4 * n], values=True)[0])


def test_nsa_kv_cache_bytes_count_every_branch_and_the_block_summaries():
    from nanoseek.model import kv_cache_bytes_per_token

    m = nsa_model(sparse_layers=["nsa", "dense"])
    nsa_cache, dense_cache = m.make_cache(1, 64)
    tensors = [t for c in nsa_cache.caches for t in (c.k, c.v)] + nsa_cache.blocks + [dense_cache.k, dense_cache.v]
    held = sum(t.numel() * t.element_size() for t in tensors) / 64
    assert kv_cache_bytes_per_token(m.config, dtype_bytes=4) == held


def test_dsa_kv_cache_bytes_count_the_indexer_keys():
    from nanoseek.model import kv_cache_bytes_per_token

    m = model("deepseek-v32-tiny", sparse_layers=["dsa", "dense"])
    dsa_cache, dense_cache = m.make_cache(1, 64)
    assert dense_cache.index_keys is None
    held = sum(t.numel() * t.element_size() for t in (dsa_cache.key, dsa_cache.index_keys, dense_cache.key)) / 64
    assert kv_cache_bytes_per_token(m.config, dtype_bytes=4) == held


def test_nsa_refuses_mla():
    with pytest.raises(NanoseekError, match="sparse='nsa'"):
        ModelConfig.from_preset("deepseek-v3-tiny", sparse="nsa")


def test_nsa_attention_map_shows_the_selected_blocks_and_window():
    from nanoseek.analysis import attention_maps

    m = model("llama-tiny", sparse="nsa", nsa_block=4, nsa_topn=4, sliding_window=3)
    x = tokens(30, batch=1)
    weights, allowed, kind = attention_maps(m, x, layer=0)
    assert kind == "nsa" and weights.shape == allowed.shape == (30, 30)
    causal = torch.ones(30, 30).tril().bool()
    assert not (allowed & ~causal).any() and (weights[~causal] == 0).all()
    # first, previous, own block and one chosen block per KV group (2 groups): at most 5 blocks of 4
    assert allowed[-1].sum() <= 20 and allowed[-1, :4].all() and allowed[-1, 24:].all()
    assert not allowed[-1].all()  # some blocks were left out


def test_v4_attention_map_in_inspect():
    from nanoseek.analysis import attention_maps

    m = model("deepseek-v4-tiny")
    weights, allowed, kind = attention_maps(m, tokens(20, batch=1), layer=1)
    assert kind == "hca" and weights.shape == allowed.shape == (20, 20 + 20 // 8)


def test_nsa_whole_selection_shortcut_equals_the_selection_path():
    m = nsa_model(nsa_topn=16)  # 40 tokens = 10 blocks of 4: every block fits in the selection
    x = tokens(40)
    attn = m.layers[0].self_attn
    assert attn.covers_every_block(0, 40) and not attn.covers_every_block(0, 80)
    with torch.no_grad():
        fast = m(x).logits
        for layer in m.layers:
            layer.self_attn.whole_selection_shortcut = False
        torch.testing.assert_close(m(x).logits, fast, atol=1e-5, rtol=1e-5)


def test_nsa_op_under_bf16_autocast_with_fp32_inputs_runs_backward():
    """The attention bench's --dtype bfloat16: fp32 q, k, v under autocast meet bf16 compressed blocks in
    NSA's compressed-branch Function; its backward (outside autocast) used to mix the two and fail.
    Forward and gradients stay near fp32's, and the gradients keep the inputs' dtype."""
    import argparse

    from nanoseek.bench import attention as ba

    parser = argparse.ArgumentParser()
    ba.add_attention_args(parser)
    args = parser.parse_args(["--heads", "4", "--head-dim", "32", "--window", "48"])
    results = []
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        nsa = ba.NsaOp(4 * 32, 4, 16, 4, 48)
        q, k, v, x = ba.make_inputs(200, 4, 32, 4 * 32)
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = ba.run_kind("nsa", q, k, v, x, args, None, nsa)
        out.float().square().mean().backward()
        assert q.grad.dtype == k.grad.dtype == torch.float32
        results.append((out.detach().float(), q.grad, k.grad))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=3e-2, rtol=5e-2)


def test_dsa_decode_gathers_its_picks_and_equals_the_masked_step(monkeypatch):
    """A decode step reads only the top-k cached latents (gathered); the logits equal those of the
    step that masks every other key, with the cache longer than top-k and for a batch of 2."""
    from nanoseek.model.attention import dsa, mla

    m = model("deepseek-v32-tiny", index_topk=4, index_n_heads=16)  # 16 heads: no ReLU ties (0 scores)
    prompt = tokens(12, batch=2)
    gathered_calls = []
    real_gather = dsa.gathered_attention
    monkeypatch.setattr(mla, "gathered_attention", lambda *a: gathered_calls.append(a[3].shape) or real_gather(*a))

    def steps() -> torch.Tensor:
        cache = m.make_cache(2, 16)
        m(prompt, cache=cache, start=0)
        return torch.cat([m(prompt[:, i : i + 1] * 0 + 7, cache=cache, start=12 + i).logits for i in range(3)], 1)

    def row_steps() -> torch.Tensor:  # per-row positions, as the server's batched step
        cache = m.make_cache(2, 16)
        m(prompt, cache=cache, start=0)
        positions = [torch.tensor([12 + i, 12 + i]) for i in range(3)]
        return torch.cat([m(prompt[:, :1] * 0 + 7, cache=cache, start=p).logits for p in positions], 1)

    with torch.no_grad():
        picked, picked_rows = steps(), row_steps()
        assert gathered_calls and all(shape[-1] == 4 for shape in gathered_calls)
        monkeypatch.setattr(mla, "DECODE_GATHER_ROWS", 0)  # every step through the (B, 1, S) mask
        masked = steps()
    torch.testing.assert_close(picked, masked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(picked_rows, masked, rtol=1e-5, atol=1e-5)


def test_dsa_gathered_attention_reads_picked_rows_of_a_strided_cache_view():
    """The decode gather indexes the cache's first S positions in place: a view of a longer cache
    (B = 2) gives the same result as a contiguous copy, and nothing is flattened to rows first."""
    from nanoseek.model.attention.dsa import gathered_attention

    g = torch.Generator().manual_seed(0)
    cache_k, cache_v = torch.randn(2, 1, 32, 6, generator=g), torch.randn(2, 1, 32, 4, generator=g)
    q = torch.randn(2, 3, 1, 6, generator=g)
    picked = torch.tensor([[[0, 5, 9]], [[2, 3, 11]]])
    valid = torch.tensor([[[True, True, False]], [[True, True, True]]])
    view = gathered_attention(q, cache_k[:, :, :12], cache_v[:, :, :12], picked, valid, 0.5)
    copy = gathered_attention(q, cache_k[:, :, :12].clone(), cache_v[:, :, :12].clone(), picked, valid, 0.5)
    torch.testing.assert_close(view, copy)
    logits = torch.einsum("bhx,bkx->bhk", q[:, :, 0], cache_k[:, 0][torch.arange(2)[:, None], picked[:, 0]]) * 0.5
    probs = logits.masked_fill(~valid[:, :1], float("-inf")).softmax(-1)  # valid (B, 1, K) over the heads
    want = torch.einsum("bhk,bkv->bhv", probs, cache_v[:, 0][torch.arange(2)[:, None], picked[:, 0]])
    torch.testing.assert_close(view[:, :, 0], want)


@pytest.mark.parametrize("masked_elements", [0, 1 << 26])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("start,t", [(0, 40), (6, 33), (37, 1)])
def test_nsa_query_groups_attend_exactly_to_their_own_picks(monkeypatch, masked_elements, group, start, t):
    """nsa_query_group = m < l: each m queries choose their own blocks (m = 1: every query, as the
    paper); the branch, gathered per group or one masked SDPA, equals masked softmax over the keys
    of each query's group's picks."""
    from nanoseek.model.attention import nsa

    monkeypatch.setattr(nsa, "MASKED_SELECTION_ELEMENTS", masked_elements)
    monkeypatch.setattr(nsa, "GROUP_CHUNK_BYTES", 1)  # gathered: one group at a time
    m = nsa_model(nsa_topn=5, nsa_query_group=group)
    attn = m.layers[0].self_attn.double()
    g = torch.Generator().manual_seed(1)
    s, l = start + t, attn.block
    q = torch.randn(2, attn.n_heads, t, attn.head_dim, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, attn.n_kv_heads, s, attn.head_dim, generator=g, dtype=torch.float64) for _ in range(2))
    _, p_cmp = attn.compressed_attention(q, attn.compress(k), attn.compress(v, values=True), start)
    first = start // l
    assert p_cmp.shape[2] == ((s - 1) // l - first + 1) * l // group
    got = attn.selected_attention(q, k, v, p_cmp, start)
    own = first + torch.arange(p_cmp.shape[2]) * group // l
    blocks, valid = attn.choose_blocks(p_cmp, own)
    chosen = torch.zeros(2, attn.n_kv_heads, blocks.shape[2], s // l + 2, dtype=torch.bool)
    chosen.scatter_(-1, blocks.masked_fill(~valid, s // l + 1), True)
    query_group = (torch.arange(start, s) - first * l) // group
    causal = torch.arange(s) <= torch.arange(start, s)[:, None]
    allowed = chosen[:, :, query_group][..., torch.arange(s) // l] & causal
    torch.testing.assert_close(got, masked_softmax_attention(attn, q, k, v, allowed))


def test_nsa_query_groups_of_a_whole_block_equal_the_block_path():
    m = nsa_model(nsa_topn=5)
    attn = m.layers[0].self_attn
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, attn.n_heads, 30, attn.head_dim, generator=g)
    k, v = (torch.randn(2, attn.n_kv_heads, 35, attn.head_dim, generator=g) for _ in range(2))
    _, p_cmp = attn.compressed_attention(q, attn.compress(k), attn.compress(v, values=True), 5)
    block_path = attn.selected_attention(q, k, v, p_cmp, 5)
    group_path = attn.selected_attention_by_group(q, k, v, p_cmp, 5)  # 35 x 35 keys: the masked SDPA
    torch.testing.assert_close(group_path, block_path, atol=1e-5, rtol=1e-5)


def test_nsa_per_token_selection_decodes_exactly_as_it_recomputes():
    """Per-token selection (nsa_query_group=1) is what a decode step does, so prefill + steps give the
    full forward's logits while the selection is active (3 of up to 10 blocks)."""
    m = nsa_model(nsa_topn=4, nsa_query_group=1)
    x = tokens(40)
    with torch.no_grad():
        full = m(x).logits
        cache = m.make_cache(2, 48)
        parts = [m(x[:, :21], cache=cache, start=0).logits]
        parts += [m(x[:, p : p + 1], cache=cache, start=p).logits for p in range(21, 40)]
        rows = m.make_cache(2, 48)
        m(x[:, :21], cache=rows, start=0)
        per_row = [m(x[:, p : p + 1], cache=rows, start=torch.tensor([p, p])).logits for p in range(21, 40)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(per_row, 1), full[:, 21:], atol=1e-5, rtol=1e-5)
    m.train()
    m(x, targets=x).loss.backward()  # the grouped path trains
    assert m.layers[0].self_attn.qkv_proj.weight.grad.abs().sum() > 0


def test_nsa_query_group_must_divide_the_block():
    with pytest.raises(NanoseekError, match="nsa_query_group=3 must divide nsa_block=4"):
        nsa_model(nsa_query_group=3)
    with pytest.raises(NanoseekError, match="nsa_query_group"):
        nsa_model(nsa_query_group=0)


def test_nsa_gathered_query_groups_have_the_masked_paths_gradients(monkeypatch):
    """The gathered per-group path (chunks recomputed in backward) gives the masked path's gradients."""
    from nanoseek.model.attention import nsa

    attn = nsa_model(nsa_topn=5, nsa_query_group=1).layers[0].self_attn.double()
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, attn.n_heads, 30, attn.head_dim, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (
        torch.randn(2, attn.n_kv_heads, 37, attn.head_dim, generator=g, dtype=torch.float64, requires_grad=True)
        for _ in range(2)
    )
    w = torch.randn(2, attn.n_heads, 30, attn.head_dim, generator=g, dtype=torch.float64)

    def grads():
        _, p_cmp = attn.compressed_attention(q, attn.compress(k), attn.compress(v, values=True), 7)
        return torch.autograd.grad((attn.selected_attention(q, k, v, p_cmp, 7) * w).sum(), (q, k, v))

    masked = grads()
    monkeypatch.setattr(nsa, "MASKED_SELECTION_ELEMENTS", 0)
    monkeypatch.setattr(nsa, "GROUP_CHUNK_BYTES", 1)
    for a, b in zip(grads(), masked):
        torch.testing.assert_close(a, b)


def test_nsa_query_group_scores_sum_their_own_queries():
    """nsa_query_group=2: the selection scores of a group are its two queries' block probabilities."""
    attn = nsa_model(nsa_query_group=2).layers[0].self_attn
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, attn.n_heads, 16, attn.head_dim, generator=g)
    kb, vb = (torch.randn(1, attn.n_kv_heads, 4, attn.head_dim, generator=g) for _ in range(2))
    _, per_query = attn.block_attention(q, kb, vb, 0, True)  # (B, G, T, n), summed over the group's heads
    _, scores = attn.compressed_attention(q, kb, vb, 0)
    torch.testing.assert_close(scores, per_query[:, :, 0::2] + per_query[:, :, 1::2])
