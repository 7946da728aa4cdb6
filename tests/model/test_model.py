import math

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.model import model_info
from nanoseek.model.attention.core import causal_attention
from nanoseek.model.norm import RMSNorm
from nanoseek.model.position import apply_rope, rope_inv_freq, sinusoidal_table

TINY = ["vaswani-tiny", "gpt2-tiny", "llama-tiny"]


def make(name, **kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset(name, **kw))


@pytest.mark.parametrize("name", TINY)
def test_shapes_and_every_parameter_gets_a_gradient(name):
    model = make(name)
    x = torch.randint(0, 128, (2, 12))
    out = model(x, targets=x)
    assert out.logits.shape == (2, 12, 128)
    out.loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", TINY)
def test_causality_future_tokens_never_change_earlier_logits(name):
    model = make(name).eval()
    x = torch.randint(0, 128, (1, 10))
    y = x.clone()
    y[0, 6:] = (y[0, 6:] + 17) % 128
    a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_initial_loss_is_near_uniform():
    model = make("gpt2-tiny")
    x, y = torch.randint(0, 128, (4, 32)), torch.randint(0, 128, (4, 32))
    assert abs(model(x, targets=y).loss.item() - math.log(128)) < 0.3


def test_tied_head_shares_the_embedding():
    model = make("gpt2-tiny")
    assert model.lm_head.weight is model.embed_tokens.weight
    assert make("llama-tiny").lm_head.weight is not make("llama-tiny").embed_tokens.weight


def test_vaswani_is_post_norm_with_scaled_sinusoidal_input():
    model = make("vaswani-tiny")
    assert model.config.norm_position == "post" and model.embed_scale == pytest.approx(8.0)
    x = torch.tensor([[3, 5]])
    expected = model.embed_tokens.weight[x] * 8.0 + sinusoidal_table(256, 64)[:2]
    torch.testing.assert_close(model.embed(x), expected)


def test_sinusoidal_table_matches_the_formula():
    table = sinusoidal_table(50, 8)
    pos, i = 7, 2
    assert table[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 8)), abs=1e-6)
    assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 8)), abs=1e-6)


def test_sdpa_path_equals_explicit_softmax_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(6, 6).triu(1).bool(), float("-inf"))
    torch.testing.assert_close(causal_attention(q, k, v, 0), scores.softmax(-1) @ v, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 3])
def test_one_query_path_equals_explicit_softmax_attention(window):
    """A decode step (one query per row): GQA heads folded into queries, per-row positions, window,
    and a DSA keep mask, against the explicit formula with the same mask."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 5)
    k_rep, v_rep = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)

    def explicit(mask_BS):
        scores = (q @ k_rep.transpose(-1, -2) * 0.3).masked_fill(~mask_BS[:, None, None], float("-inf"))
        return scores.softmax(-1) @ v_rep

    pos = torch.arange(9)
    start = torch.tensor([4, 8])  # per-row positions against a 9-slot cache
    mask = pos[None] <= start[:, None]
    if window is not None:
        mask &= pos[None] > start[:, None] - window
    torch.testing.assert_close(
        causal_attention(q, k, v, start, 0.3, window=window), explicit(mask), atol=1e-6, rtol=1e-5
    )
    keep = torch.rand(2, 1, 9) > 0.5
    keep[..., 0] = True
    torch.testing.assert_close(causal_attention(q, k, v, 8, 0.3, keep=keep), explicit(keep[:, 0]), atol=1e-6, rtol=1e-5)
    whole = (pos > 8 - window) if window else torch.ones(9, dtype=torch.bool)
    torch.testing.assert_close(
        causal_attention(q, k, v, 8, 0.3, window=window), explicit(whole.expand(2, 9)), atol=1e-6, rtol=1e-5
    )


def test_rope_attention_keeps_only_its_own_tensors_for_backward():
    # q, k rotated in (B, T, H, d) layout: SDPA returns that layout, so o_proj's input is a view of
    # the output SDPA keeps anyway, and v is its own copy, not a view holding all of q/k/v
    from nanoseek.model.attention.mha import MultiHeadAttention

    cfg = ModelConfig.from_preset("llama-tiny")
    attn = MultiHeadAttention(cfg)
    b, t, hd = 2, 24, attn.head_dim
    x = torch.randn(b, t, cfg.hidden_size, requires_grad=True)
    rope = (torch.ones(t, hd // 2), torch.zeros(t, hd // 2))
    weights = {p.untyped_storage().data_ptr() for p in attn.parameters()}
    storages = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        attn(x, rope).sum().backward()
    per_token = cfg.hidden_size + (2 * attn.n_heads + 2 * attn.n_kv_heads) * hd  # x, q, out, k, v
    extra = 4 * b * attn.n_heads * t + 2 * 4 * t * hd // 2  # SDPA's logsumexp, the cos/sin tables
    assert sum(storages.values()) <= 4 * b * t * per_token + extra


def test_rmsnorm_formula():
    x = torch.randn(3, 16)
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.mul_(2.0)
    expected = 2.0 * x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), expected)


@pytest.mark.parametrize("interleave", [True, False])
def test_rope_makes_scores_depend_on_relative_position(interleave):
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    inv = rope_inv_freq(16, 10000.0)
    angles = torch.arange(40.0)[:, None] * inv
    cos, sin = angles.cos(), angles.sin()

    def score(m, n):
        return (
            apply_rope(q, cos[m : m + 1], sin[m : m + 1], interleave)
            * apply_rope(k, cos[n : n + 1], sin[n : n + 1], interleave)
        ).sum()

    assert score(5, 2).item() == pytest.approx(score(30, 27).item(), abs=1e-4)
    assert score(5, 2).item() != pytest.approx(score(5, 4).item(), abs=1e-4)


def test_info_counts_parameters_and_kv_bytes():
    info = model_info(ModelConfig.from_preset("gpt2-mini"))
    # 4 layers x 12 d^2 + (vocab 128 + 256 positions) x d + norms/biases
    model = make("gpt2-mini")
    assert info["params_total"] == sum(p.numel() for p in model.parameters())
    assert info["params_active"] == info["params_total"]  # dense: a token uses every weight
    # non-embedding excludes the lookup tables (token + learned positions)
    assert info["params_active_non_embedding"] == info["params_total"] - (128 + 256) * 128
    assert info["kv_cache_bytes_per_token"] == 4 * 2 * 128 * 2
    assert info["flops_per_token"] > 6 * 4 * 12 * 128**2
    gqa = model_info(ModelConfig.from_preset("llama-tiny"))
    assert gqa["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 16 * 2  # layers, k+v, kv heads, head dim, bf16


def test_depth_scaled_init_of_output_projections():
    model = make("gpt2-mini")
    std_out = model.layers[0].self_attn.o_proj.weight.std().item()
    std_in = model.layers[0].self_attn.qkv_proj.weight.std().item()
    assert std_out == pytest.approx(0.02 / math.sqrt(8), rel=0.1)
    assert std_in == pytest.approx(0.02, rel=0.1)


def test_dropout_only_in_training():
    model = make("gpt2-tiny", hidden_dropout=0.5, attention_dropout=0.5)
    x = torch.randint(0, 128, (1, 8))
    model.eval()
    torch.testing.assert_close(model(x).logits, model(x).logits)
    model.train()
    assert not torch.allclose(model(x).logits, model(x).logits)


def test_context_limit_is_enforced():
    model = make("gpt2-tiny")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 257, dtype=torch.long))


def test_mqa_shares_one_key_value_head():
    model = make("llama-tiny", attention="mqa", num_key_value_heads=None)
    cache = model.make_cache(1, 8)
    assert cache[0].k.shape == (1, 1, 8, 16)
    x = torch.randint(0, 128, (1, 8))
    assert model(x).logits.shape == (1, 8, 128)


@pytest.mark.parametrize("fusion", ["residual", "mhc"])
def test_activation_checkpointing_gives_the_same_gradients(fusion):
    x = torch.randint(0, 128, (2, 12))
    grads = []
    for checkpointing in (False, True):
        model = make("llama-tiny", fusion=fusion, hc_mult=2)
        model.gradient_checkpointing = checkpointing
        model(x, targets=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_training_forward_with_fused_loss_matches_the_logits_path():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("deepseek-v3-tiny", num_nextn_predict_layers=1)).train()
    x, y = torch.randint(0, 128, (2, 12)), torch.randint(0, 128, (2, 12))
    grads = []
    for return_logits in (True, False):
        torch.manual_seed(1)  # same dropout / routing noise, if any
        out = model(x, y, return_logits=return_logits)
        assert (out.logits is None) == (not return_logits)
        (out.loss + out.aux["mtp_loss"]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
        if return_logits:
            first = out.loss.detach()
    torch.testing.assert_close(out.loss.detach(), first, atol=1e-6, rtol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("kwargs", [{"is_causal": True}, {"mask": True}])
def test_sdpa_with_expanded_kv_heads_equals_grouped(monkeypatch, kwargs):
    """sdpa's CUDA fallback (K/V heads expanded before the kernel) gives the grouped call's output and
    gradients; run here by forcing the expansion on the CPU."""
    from nanoseek.model.attention import core as attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 20, 16, generator=g) for n in (8, 2, 2))
    if "mask" in kwargs:
        kwargs = {"attn_mask": torch.rand(2, 1, 20, 20, generator=g) > 0.3}
        kwargs["attn_mask"][..., 0] = True
    results = []
    for expand in (False, True):
        monkeypatch.setattr(attention, "expands_kv_heads", lambda q, mask, expand=expand: expand)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = attention.sdpa(*leaves, scale=0.3, **kwargs)
        out.square().sum().backward()
        results.append([out.detach()] + [x.grad for x in leaves])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "mask_shape,float_mask",
    [((20, 24), False), ((2, 1, 20, 24), False), ((1, 8, 20, 24), True), ((8, 20, 24), True), ((2, 1, 1, 24), False)],
)
def test_sdpa_with_grouped_heads_folded_into_rows_equals_the_grouped_call(monkeypatch, mask_shape, float_mask):
    """The CPU's folded call (each key head's query heads as rows of one head, the mask repeated or
    viewed) gives the grouped call's output and gradients, for every mask shape SDPA broadcasts."""
    from nanoseek.model.attention import core as attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 8, 20, 16, generator=g),
        torch.randn(2, 2, 24, 16, generator=g),
        torch.randn(2, 2, 24, 12, generator=g),
    )
    mask = torch.randn(mask_shape, generator=g) if float_mask else torch.rand(mask_shape, generator=g) > 0.3
    if not float_mask:
        mask[..., 0] = True
    assert attention.folds_grouped_heads(q, mask, is_causal=False)
    results = []
    for fold in (False, True):
        monkeypatch.setattr(attention, "FOLD_GROUPED_HEADS", fold)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = attention.sdpa(*leaves, attn_mask=mask, scale=0.3)
        out.square().sum().backward()
        results.append([out.detach()] + [x.grad for x in leaves])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not attention.folds_grouped_heads(q, None, is_causal=True)
    assert not attention.folds_grouped_heads(q, torch.ones(2, 2, 20, 24, dtype=torch.bool), is_causal=False)


@pytest.mark.parametrize(
    "mask_shape,float_mask,autocast",
    [
        (None, False, False),
        (None, False, True),
        ((20, 24), False, False),
        ((2, 1, 20, 24), False, True),
        ((1, 8, 20, 24), True, False),
        ((8, 20, 24), True, True),
    ],
)
def test_bf16_sdpa_on_short_rows_is_explicit_and_as_accurate_as_the_flash_kernel(mask_shape, float_mask, autocast):
    """bf16 on the CPU with few keys (bf16 tensors, or fp32 ones under bf16 autocast): `sdpa` runs
    explicit matmuls (fp32 logits and softmax) whose output and gradients are no further from the
    fp64 answer than the flash kernel's own bf16 ones."""
    from nanoseek.model.attention import core as attention

    g = torch.Generator().manual_seed(0)
    t, s = (24, 24) if mask_shape is None else (20, 24)
    q, k, v = (torch.randn(2, h, n, 16, generator=g).bfloat16() for h, n in ((8, t), (2, s), (2, s)))
    mask = None
    if mask_shape is not None:
        mask = torch.randn(mask_shape, generator=g) if float_mask else torch.rand(mask_shape, generator=g) > 0.3
        if not float_mask:
            mask[..., 0] = True
    causal = mask is None
    assert attention.explicit_attention_pays(q, k, 0.0) and not attention.explicit_attention_pays(q.float(), k, 0.0)
    assert not attention.explicit_attention_pays(q, k, 0.1)

    def run(fn, dtype):
        cast = autocast and dtype == torch.bfloat16
        dtype = torch.float32 if cast else dtype
        leaves = [x.to(dtype).clone().requires_grad_() for x in (q, k, v)]
        m = mask if mask is None or mask.dtype == torch.bool else mask.to(dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast):
            assert attention.explicit_attention_pays(leaves[0], leaves[1], 0.0) == (dtype != torch.float64)
            out = fn(*leaves, attn_mask=m, is_causal=causal, scale=0.3)
        out.float().square().sum().backward()
        return [out.detach().double()] + [x.grad.double() for x in leaves]

    def flash(q, k, v, **kw):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)

    exact, explicit, fused = run(flash, torch.float64), run(attention.sdpa, torch.bfloat16), run(flash, torch.bfloat16)
    for want, got, kernel in zip(exact, explicit, fused):
        assert (got - want).abs().max() <= 1.5 * (kernel - want).abs().max() + 1e-3 * want.abs().max()


@pytest.mark.parametrize("float_mask", [False, True])
def test_explicit_attention_gives_zeros_for_a_row_with_every_key_hidden_as_sdpa(float_mask):
    from nanoseek.model.attention.core import explicit_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, n, 8, generator=g).bfloat16().requires_grad_() for n in (5, 6, 6))
    keep = torch.rand(5, 6, generator=g) > 0.3
    keep[:, 0], keep[2] = True, False  # row 2 sees no key
    mask = torch.zeros(5, 6).masked_fill(~keep, float("-inf")) if float_mask else keep
    out = explicit_attention(q, k, v, attn_mask=mask)
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
    with pytest.raises(ValueError, match="query heads"):
        explicit_attention(q[:, :3], k[:, :2], v[:, :2])


def test_sdpa_expands_kv_heads_only_where_cuda_lacks_a_grouped_kernel():
    from types import SimpleNamespace

    from nanoseek.model.attention.core import expands_kv_heads

    def rule(device, dtype, masked):
        return expands_kv_heads(
            SimpleNamespace(device=torch.device(device), dtype=dtype), torch.ones(1) if masked else None
        )

    assert not rule("cpu", torch.float32, True) and not rule("cpu", torch.bfloat16, False)
    assert not rule("cuda", torch.bfloat16, False) and not rule("cuda", torch.float16, False)  # flash
    assert rule("cuda", torch.float32, False) and rule("cuda", torch.bfloat16, True)  # memory-efficient
