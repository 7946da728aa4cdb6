"""DeepSeek-V2/V3 parts: RoPE/YaRN, MLA (latent cache, absorbed decode), DeepSeekMoE, MTP."""

import math

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.config import mscale
from nanoseek.generation.loop import decode_step, prefill
from nanoseek.model import kv_cache_bytes_per_token, model_info
from nanoseek.model.moe import MoE, Router
from nanoseek.model.position import rope_attention_factor, rope_inv_freq, softmax_scale
from nanoseek.model.side_outputs import SideOutputs

V3_YARN = dict(
    rope_type="yarn",
    factor=40,
    original_max_position_embeddings=4096,
    beta_fast=32,
    beta_slow=1,
    mscale=1.0,
    mscale_all_dim=1.0,
)


def make(name, **kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset(name, **kw))


# ------------------------------------------------------------------------------------ RoPE / YaRN


def test_yarn_inverse_frequencies_match_the_closed_form():
    dim, theta, s = 64, 10000.0, 40.0
    inv = rope_inv_freq(dim, theta, V3_YARN)
    base = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
    # V3: low = 10, high = 23: below low extrapolate (base), above high interpolate (base / s)
    torch.testing.assert_close(inv[:10], base[:10])
    torch.testing.assert_close(inv[23:], base[23:] / s)
    ramp = (torch.arange(10, 23).float() - 10) / 13
    torch.testing.assert_close(inv[10:23], base[10:23] / s * ramp + base[10:23] * (1 - ramp))


def test_yarn_reference_table():
    inv = rope_inv_freq(64, 10000.0, V3_YARN)
    # values computed independently from the formula in the architecture reference
    # theta^(-2i/64): i=9 -> 0.0749894209 (below the ramp), i=16 -> 0.01 (ramp 6/13), i=31 -> 1.333521e-4 / 40
    expected = {0: 1.0, 9: 0.0749894209, 16: 0.01 / 40 * (6 / 13) + 0.01 * (7 / 13), 31: 1.333521432e-4 / 40}
    for i, value in expected.items():
        assert inv[i].item() == pytest.approx(value, rel=1e-5), i


def test_mla_softmax_scale_under_yarn():
    cfg = ModelConfig.from_preset("deepseek-v3")
    assert softmax_scale(cfg, 192) == pytest.approx(0.135234, abs=1e-6)
    lite = ModelConfig.from_preset("deepseek-v2-lite")
    assert softmax_scale(lite, 192) == pytest.approx(0.114721, abs=1e-6)
    assert rope_attention_factor(V3_YARN) == 1.0
    assert mscale(40, 1.0) == pytest.approx(1 + 0.1 * math.log(40))


# ------------------------------------------------------------------------------------ MLA


@pytest.mark.parametrize("name", ["deepseek-v2-tiny", "deepseek-v3-tiny"])
def test_mla_cache_stores_only_latent_and_rope_key(name):
    model = make(name)
    cache = model.make_cache(2, 16)
    assert cache[0].latent.shape == (2, 16, 16) and cache[0].k_rope.shape == (2, 16, 8)
    assert not hasattr(cache[0], "k")


@pytest.mark.parametrize("name", ["deepseek-v2-tiny", "deepseek-v3-tiny"])
@pytest.mark.parametrize("absorb", [True, False])
def test_mla_decode_equals_full_recompute(name, absorb):
    model = make(name).eval()
    for m in model.modules():
        if hasattr(m, "absorb"):
            m.absorb = absorb
    seq = torch.randint(0, 128, (2, 12))
    full = model(seq).logits
    cache = model.make_cache(2, 12)
    with torch.no_grad():
        steps = [prefill(model, seq[:, :7], cache)]
        for pos in range(7, 11):
            steps.append(decode_step(model, seq[:, pos : pos + 1], cache, pos))
    for i, logits in enumerate(steps):
        torch.testing.assert_close(logits, full[:, 6 + i], atol=2e-5, rtol=1e-4)


def test_absorbed_equals_expanded_attention_for_a_chunk():
    model = make("deepseek-v3-tiny").eval()
    seq = torch.randint(0, 128, (1, 10))
    outs = []
    for absorb in (True, False):
        for m in model.modules():
            if hasattr(m, "absorb"):
                m.absorb = absorb
        cache = model.make_cache(1, 10)
        with torch.no_grad():
            model(seq[:, :4], cache=cache)
            outs.append(model(seq[:, 4:], cache=cache, start=4).logits)  # a 6-token chunk at offset 4
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)


def test_mla_kv_bytes_against_mha_of_the_same_width():
    v3 = ModelConfig.from_preset("deepseek-v3")
    assert kv_cache_bytes_per_token(v3) == 61 * (512 + 64) * 2
    mha = v3.replace(attention="mha", ffn="swiglu", head_dim=192)
    assert kv_cache_bytes_per_token(mha) / kv_cache_bytes_per_token(v3) > 80


@pytest.mark.parametrize("name", ["deepseek-v2-tiny", "deepseek-v3-tiny"])
def test_deepseek_causality_and_gradients(name):
    model = make(name)
    x = torch.randint(0, 128, (2, 12))
    out = model(x, targets=x)
    (out.loss + sum(out.aux.values())).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    model.eval()
    y = x.clone()
    y[:, 8:] = (y[:, 8:] + 1) % 128
    torch.testing.assert_close(model(x).logits[:, :8], model(y).logits[:, :8], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------ MoE


def router(**kw):
    cfg = ModelConfig.from_preset("deepseek-v3-tiny", **kw)
    r = Router(cfg)
    torch.nn.init.normal_(r.weight, 0, 1.0)
    return r


def test_gathered_grouped_mm_matches_gather_then_per_expert_products():
    from nanoseek.kernels.grouped_mm import GatheredGroupedMM

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, generator=g, requires_grad=True)
    rows = torch.tensor([0, 3, 3, 1, 4, 0, 2, 2, 1, 4])  # each token twice (top-2), sorted by expert
    counts = torch.tensor([3, 0, 4, 3])
    w = torch.randn(4, 8, 16, generator=g, requires_grad=True)
    y = GatheredGroupedMM.apply(x, rows, w, counts.cumsum(0).to(torch.int32))
    want = torch.cat([piece @ w[e].T for e, piece in enumerate(x[rows].split(counts.tolist()))])
    torch.testing.assert_close(y, want)
    dy = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (x, w), dy), torch.autograd.grad(want, (x, w), dy)):
        torch.testing.assert_close(a, b)


def test_moe_layer_in_float64_falls_back_from_grouped_mm():
    # torch._grouped_mm takes fp32/bf16/fp16 only: the fused expert path must not be chosen for fp64
    torch.manual_seed(0)
    m = Transformer(ModelConfig.from_preset("deepseek-v3-tiny")).double().train()
    x = torch.randint(0, 100, (2, 12))
    loss = m(x, x).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in m.layers[1].mlp.experts.parameters())


@pytest.mark.parametrize(
    "kw",
    [
        dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=1, norm_topk_prob=True),
        dict(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False),
        dict(scoring_func="softmax", topk_method="group_limited_greedy", n_group=2, topk_group=1, norm_topk_prob=False),
    ],
)
def test_router_picks_exactly_k_distinct_experts(kw):
    r = router(n_routed_experts=8, num_experts_per_tok=3, **{**kw, "topk_group": 2 if kw["n_group"] > 1 else 1})
    idx, w, scores = r(torch.randn(50, 64))
    assert idx.shape == (50, 3) and w.shape == (50, 3)
    assert all(len(set(row.tolist())) == 3 for row in idx)
    if kw["norm_topk_prob"]:
        torch.testing.assert_close(w.sum(-1), torch.ones(50))
    else:
        torch.testing.assert_close(w, scores.gather(1, idx))


def test_group_limited_selection_stays_in_the_kept_groups():
    r = router(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=1)
    idx, _, _ = r(torch.randn(100, 64))
    groups = idx // 2
    assert (groups[:, 0] == groups[:, 1]).all()


def test_bias_changes_selection_only_never_the_weights():
    r = router(n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, routed_scaling_factor=2.5)
    x = torch.randn(64, 64)
    idx0, w0, s0 = r(x)
    r.e_score_correction_bias[:] = torch.tensor([10.0, 10.0, 0.0, 0.0])
    idx1, w1, s1 = r(x)
    assert (idx1.sort(-1).values == torch.tensor([0, 1])).all()  # the bias forces experts 0 and 1
    raw = s1.gather(1, idx1)
    torch.testing.assert_close(w1, raw / raw.sum(-1, keepdim=True) * 2.5)  # unbiased scores
    torch.testing.assert_close(s0, s1)


def test_moe_dispatch_equals_a_per_token_reference():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("deepseek-v3-tiny")
    moe = MoE(cfg)
    moe.reset_extra_parameters(0.2, 0.2)
    x = torch.randn(2, 5, 64)
    y = moe(x)
    idx, w, _ = moe.gate(x.view(-1, 64))
    ref = moe.shared_experts(x.view(-1, 64))
    for n in range(10):
        for j in range(2):
            e = idx[n, j]
            g, u = (moe.experts.gate_up_proj[e] @ x.view(-1, 64)[n]).split(32)
            ref[n] += w[n, j] * (moe.experts.down_proj[e] @ (torch.nn.functional.silu(g) * u))
    torch.testing.assert_close(y.view(-1, 64), ref, atol=1e-5, rtol=1e-4)


def test_aux_free_balancing_lowers_imbalance_on_a_skewed_stream():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(
        "deepseek-v3-tiny", n_routed_experts=8, n_group=1, topk_group=1, bias_update_speed=0.01
    )
    moe = MoE(cfg).train()
    moe.reset_extra_parameters(0.02, 0.02)
    with torch.no_grad():
        moe.gate.weight[0] += 0.5  # expert 0 favoured by a constant direction in the input
    stream = torch.randn(40, 64, 64) * 0.5 + 1.0

    def step(batch):  # a forward reports its load; the bias update takes it back
        side = SideOutputs()
        moe(batch[None], side=side)
        return moe.update_balance_bias(side.expert_loads[0])["max_over_mean"]

    with torch.no_grad():
        before = step(stream[0])
        for batch in stream[1:]:
            after = step(batch)
    assert before > 2.0 and after < before / 1.5
    assert moe.gate.e_score_correction_bias[0] < 0  # the overloaded expert was pushed down


def test_sequence_balance_loss_is_positive_and_differentiable():
    cfg = ModelConfig.from_preset("deepseek-v3-tiny", aux_loss_alpha=0.01)
    model = Transformer(cfg).train()
    x = torch.randint(0, 128, (2, 8))
    out = model(x, targets=x)
    assert out.aux["balance_loss"].item() > 0 and out.aux["balance_loss"].requires_grad


def test_training_forward_returns_the_expert_load_of_every_moe_layer():
    model = make("deepseek-v3-tiny", num_nextn_predict_layers=1).train()
    x = torch.randint(0, 128, (2, 8))
    out = model(x, targets=x)
    moe = model.moe_layers()
    assert out.expert_load.shape == (len(moe), moe[0].n_experts) and not out.expert_load.requires_grad
    assert out.expert_load[0].sum() == 2 * 8 * moe[0].top_k  # every token's k copies, main layer
    assert out.expert_load[-1].sum() == 2 * 7 * moe[0].top_k  # the MTP block sees one position less
    assert all(not hasattr(m, "tokens_per_expert") and not hasattr(m, "aux_loss") for m in moe)
    assert model.eval()(x, targets=x).expert_load is None


def test_balance_bias_update_takes_the_summed_load():
    model = make("deepseek-v3-tiny", num_nextn_predict_layers=0)
    load = torch.tensor([[6, 1, 1, 0]])
    stats = model.update_balance_bias(load)
    gamma = model.config.bias_update_speed
    bias = model.moe_layers()[0].gate.e_score_correction_bias
    torch.testing.assert_close(bias, gamma * torch.tensor([-1.0, 1.0, 1.0, 1.0]))
    assert stats == {"moe_max_over_mean": 3.0, "moe_load": [[0.75, 0.125, 0.125, 0.0]]}
    assert model.update_balance_bias(None) == {}


def test_moe_bias_is_not_trained_by_the_optimizer():
    model = make("deepseek-v3-tiny")
    names = [n for n, _ in model.named_parameters()]
    assert not any("e_score_correction_bias" in n for n in names)
    assert any("e_score_correction_bias" in n for n, _ in model.named_buffers())


# ------------------------------------------------------------------------------------ MTP and counts


def test_mtp_loss_decreases_in_a_short_run():
    model = make("deepseek-v3-tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 128, (4, 24))
    first = None
    for _ in range(30):
        out = model(x[:, :-1], targets=x[:, 1:])
        loss = out.loss + out.aux["mtp_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else out.aux["mtp_loss"].item()
    assert out.aux["mtp_loss"].item() < 0.5 * first


def test_mtp_loss_is_weighted_cross_entropy_of_t_plus_2():
    model = make("deepseek-v3-tiny", mtp_loss_weight=1.0).eval()
    x = torch.randint(0, 128, (1, 9))
    inp, tgt = x[:, :-1], x[:, 1:]
    out = model(inp, targets=tgt)
    mod = model.mtp[0]
    _, normed = mod(out.hidden[:, :7], model.embed_tokens(tgt[:, :7]), model.rope(0, 7, "cpu"))
    logits = model.lm_head(normed)
    expected = torch.nn.functional.cross_entropy(logits[0], x[0, 2:])
    torch.testing.assert_close(out.aux["mtp_loss"], expected)


def test_published_parameter_counts():  # DeepSeek's activated counts leave the embedding table out
    v3 = model_info(ModelConfig.from_preset("deepseek-v3"))
    assert v3["params_total"] / 671e9 == pytest.approx(1.0, abs=0.01)
    assert v3["params_active_non_embedding"] / 37e9 == pytest.approx(1.0, abs=0.011)
    assert v3["params_active"] - v3["params_active_non_embedding"] == 129280 * 7168
    assert v3["params_mtp"] > 11e9
    v2 = model_info(ModelConfig.from_preset("deepseek-v2"))
    assert v2["params_total"] / 236e9 == pytest.approx(1.0, abs=0.01)
    assert v2["params_active_non_embedding"] / 21e9 == pytest.approx(1.0, abs=0.02)
    lite = model_info(ModelConfig.from_preset("deepseek-v2-lite"))
    assert lite["params_total"] / 15.7e9 == pytest.approx(1.0, abs=0.01)
    assert lite["params_active_non_embedding"] / 2.4e9 == pytest.approx(1.0, abs=0.03)


# ------------------------------------------------------------------------------------ speculative


def trained_on_a_cycle(steps=60):
    model = make("deepseek-v3-tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cycle = torch.arange(40) % 13 + 3
    batch = torch.stack([cycle.roll(-i) for i in range(8)])
    for _ in range(steps):
        out = model(batch[:, :-1], targets=batch[:, 1:])
        opt.zero_grad()
        (out.loss + out.aux["mtp_loss"]).backward()
        opt.step()
    return model.eval()


def test_speculative_decoding_equals_greedy_and_accepts_drafts():
    from nanoseek import generate
    from nanoseek.generation.speculative import speculative_generate

    model = trained_on_a_cycle()
    prompt = [3, 4, 5, 6]
    plain = generate(model, prompt, max_new_tokens=20, temperature=0)
    fast, stats = speculative_generate(model, prompt, max_new_tokens=20)
    assert fast.tolist() == plain.tolist()
    assert stats.acceptance_rate > 0.5 and stats.forwards < 20


def test_speculative_decoding_equals_greedy_with_random_weights():
    from nanoseek import generate
    from nanoseek.generation.speculative import speculative_generate

    model = make("deepseek-v3-tiny").eval()
    prompt = torch.randint(0, 128, (9,)).tolist()
    for n in (1, 2, 7, 16):
        fast, _ = speculative_generate(model, prompt, max_new_tokens=n)
        assert fast.tolist() == generate(model, prompt, max_new_tokens=n, temperature=0).tolist()


def test_opaque_grouped_mm_matches_torch_and_passes_opcheck():
    """`nanoseek::grouped_mm` (what a compiled fp32 MoE step calls): torch._grouped_mm's product and
    gradients, and torch.library.opcheck's schema / fake-tensor / autograd checks."""
    from nanoseek.kernels.grouped_mm import opaque_grouped_mm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g, requires_grad=True)
    w = torch.randn(4, 16, 32, generator=g, requires_grad=True)
    offsets = torch.tensor([10, 30, 30, 64], dtype=torch.int32)  # expert 2 gets no rows
    want = torch._grouped_mm(x, w.transpose(1, 2), offs=offsets)
    want_grads = torch.autograd.grad(want.square().sum(), (x, w))
    got = opaque_grouped_mm(x, w.transpose(1, 2), offsets)
    got_grads = torch.autograd.grad(got.square().sum(), (x, w))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)
    torch.library.opcheck(opaque_grouped_mm, (x, w.detach().transpose(1, 2).requires_grad_(), offsets))


def test_speculative_text_report_equals_greedy_through_the_detokenizer():
    """`nanoseek sample --speculative`'s library call: the text comes from the one detokenizer and the
    report says the ids equal greedy decoding's."""
    from nanoseek import generate
    from nanoseek.generation.speculative import compare_with_greedy

    class Ascii:
        eos_id, vocab_size = None, 128

        def encode(self, text):
            return list(text.encode())

        def decode_bytes(self, ids):
            return bytes(ids)

    model = make("deepseek-v3-tiny").eval()
    text, report = compare_with_greedy(model, Ascii(), "abc", 8)
    assert report["same_as_greedy"] and report["speculative_tokens"] == 8
    assert text == bytes(generate(model, list(b"abc"), max_new_tokens=8, temperature=0).tolist()).decode()
