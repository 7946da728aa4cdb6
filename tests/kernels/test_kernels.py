"""The fast paths of nanoseek.kernels against their model/ references: values and gradients."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from nanoseek import ModelConfig, Transformer
from nanoseek.kernels.norm import FusedRMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_backward_equals_autograd_of_the_formula(dtype):
    """The memory-saving backward (keeps x and rstd only) against autograd through the formula."""
    torch.manual_seed(0)
    norm = FusedRMSNorm(16)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(3, 5, 16)
    (norm(x).float() * grad_y).sum().backward()
    got_x, got_w = x.grad.clone(), norm.weight.grad.clone()
    x.grad, norm.weight.grad = None, None
    x32 = x.float()
    formula = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps)).to(dtype)
    (formula.float() * grad_y).sum().backward()
    torch.testing.assert_close(got_x, x.grad, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got_w, norm.weight.grad, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_inference_path_equals_the_training_function(dtype):
    """Without autograd RMSNorm runs torch's fused rms_norm; same values, same rounding order."""
    torch.manual_seed(0)
    norm = FusedRMSNorm(16).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 16, dtype=dtype) * 3
    with torch.inference_mode():
        fast = norm(x)
    recorded = norm(x.clone().requires_grad_())
    assert recorded.grad_fn.name().startswith("RMSNormFunction")
    assert fast.dtype == dtype
    torch.testing.assert_close(fast, recorded.detach(), atol=0, rtol=0)


def test_swiglu_backward_passes_gradcheck():
    from nanoseek.kernels.swiglu import swiglu

    gate, up = (torch.randn(4, 7, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(swiglu, (gate, up))
    assert swiglu(gate, up).grad_fn.name().startswith("SwiGLUFunction")


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_down_dense_passes_gradcheck_and_keeps_no_hidden(bias, monkeypatch):
    from nanoseek.kernels import swiglu as ffn
    from nanoseek.kernels.swiglu import swiglu_down

    monkeypatch.setattr(ffn, "BACKWARD_ROWS", 4)  # the backward's row chunks: 4 + 2 rows

    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn(2, 3, 16, generator=g, dtype=torch.float64, requires_grad=True)  # [gate, up]
    w = torch.randn(4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    assert torch.autograd.gradcheck(lambda *a: swiglu_down(*a), (gate_up, w, b))
    scale = torch.rand(6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: swiglu_down(*a[:3], row_scale=a[3]), (gate_up.flatten(0, 1), w, b, scale)
    )
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = swiglu_down(gate_up, w, b)
    assert y.grad_fn.name().startswith("SwiGLUDownFunction")
    assert torch.Size([2, 3, 8]) not in saved and torch.Size([2, 3, 16]) in saved  # [g, u] kept, h not
    gate, up = gate_up.split(8, dim=-1)
    want = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, w, b)
    torch.testing.assert_close(y, want)


def test_swiglu_down_grouped_matches_per_expert_products():
    from nanoseek.kernels.swiglu import swiglu_down

    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 5, 2])  # an expert with no rows too
    gate_up = torch.randn(10, 16, generator=g, requires_grad=True)  # grouped_mm: no fp64
    w = torch.randn(4, 16, 8, generator=g, requires_grad=True)
    s = torch.rand(10, generator=g, requires_grad=True)  # the router weight of each row
    y = swiglu_down(gate_up, w, offsets=counts.cumsum(0).to(torch.int32), row_scale=s)
    assert y.grad_fn.name().startswith("SwiGLUDownFunction")
    gate, up = gate_up.split(8, dim=-1)
    h = torch.nn.functional.silu(gate) * up
    want = torch.cat([piece @ w[e].T for e, piece in enumerate(h.split(counts.tolist()))]) * s[:, None]
    torch.testing.assert_close(y, want)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (gate_up, w, s), dy)
    ref = torch.autograd.grad(want, (gate_up, w, s), dy)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_mlp_function_passes_gradcheck_in_row_chunks_and_keeps_no_hidden(bias, monkeypatch):
    from nanoseek.kernels import swiglu as ffn

    monkeypatch.setattr(ffn, "BACKWARD_ROWS", 4)  # 7 rows: chunks of 4 + 3
    torch.manual_seed(0)
    mlp = ffn.FusedSwiGLU(6, 5, bias=bias).double()
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    params = (mlp.gate_up_proj.weight, mlp.gate_up_proj.bias, mlp.down_proj.weight, mlp.down_proj.bias)
    assert torch.autograd.gradcheck(lambda *a: ffn.SwiGLUMLPFunction.apply(*a), (x, *params))
    y = mlp(x)
    assert y.grad_fn.name().startswith("SwiGLUMLPFunction")
    assert [t.shape for t in y.grad_fn.saved_tensors] == [(7, 6), (10, 6), (7, 10), (6, 5)]  # x, W_gu, [g, u], W_down
    gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
    torch.testing.assert_close(y, mlp.down_proj(torch.nn.functional.silu(gate) * up))


def test_swiglu_ffn_under_bf16_autocast_matches_the_unfused_products():
    from nanoseek.kernels.swiglu import FusedSwiGLU as SwiGLU
    from nanoseek.kernels.swiglu import swiglu

    torch.manual_seed(0)
    ffn = SwiGLU(16, 32)
    x = torch.randn(2, 5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ffn(x)
        gate, up = ffn.gate_up_proj(x).split(32, dim=-1)
        want = ffn.down_proj(swiglu(gate, up))
    assert y.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(y, want, atol=0, rtol=0)
    got = torch.autograd.grad(y.float().sum(), (x, ffn.down_proj.weight, ffn.gate_up_proj.weight))
    ref = torch.autograd.grad(want.float().sum(), (x, ffn.down_proj.weight, ffn.gate_up_proj.weight))
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_linear_cross_entropy_equals_head_then_cross_entropy(monkeypatch):
    """Fused head + loss (gradient formed in the forward, several chunks, ignored rows) against
    F.cross_entropy of the full logits: same loss, same gradients for h and W."""
    from nanoseek.kernels import cross_entropy as L

    monkeypatch.setattr(L, "chunk_rows", lambda vocab: 64)  # 3 chunks below
    torch.manual_seed(0)
    h = torch.randn(150, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 10, (150,))
    y[::7] = -1
    fused = L.linear_cross_entropy(h, w, y)
    (2.5 * fused).backward()
    got_h, got_w = h.grad.clone(), w.grad.clone()
    h.grad, w.grad = None, None
    plain = F.cross_entropy(h @ w.T, y, ignore_index=-1)
    (2.5 * plain).backward()
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(got_h, h.grad)
    torch.testing.assert_close(got_w, w.grad)
    with torch.no_grad():
        torch.testing.assert_close(L.linear_cross_entropy(h, w, y), plain.detach())


def rmsnorm_then_linear(norm, linear, x):
    return linear(norm(x))


def test_recomputed_norm_outputs_frees_the_norm_output_and_forgets_dead_ones():
    import weakref

    from nanoseek.kernels.norm import active_recipes, recomputed_norm_outputs

    torch.manual_seed(0)
    norm, linear = FusedRMSNorm(16), torch.nn.Linear(16, 8)
    x = torch.randn(4, 3, 16, requires_grad=True)
    held, grads = {}, {}
    for recompute in (False, True):
        with recomputed_norm_outputs() if recompute else contextlib.nullcontext():
            normed = norm(x)
            y = linear(normed)  # saves (a view of) normed for its weight gradient
            probe = weakref.ref(normed)
            del normed
            held[recompute] = probe() is not None
            if recompute:
                dead = norm(x).untyped_storage().data_ptr()  # an output nobody keeps
                assert dead not in active_recipes()  # its entry went with it
        grads[recompute] = torch.autograd.grad(y.square().sum(), (x, norm.weight, linear.weight))
    assert held == {False: True, True: False}
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_recomputed_norm_outputs_leave_no_cycle_behind():
    """A graph that backward never runs (an indexer's top-k over scores with a graph) dies with its
    tensors: a node that saves its own output (amax) must not hold itself through the saved tensor."""
    import gc
    import weakref

    from nanoseek.kernels.norm import recomputed_norm_outputs

    x = torch.randn(4, 8, requires_grad=True)
    with recomputed_norm_outputs():
        y = (x * 2).topk(3, dim=-1).values
        z = y.amax()  # saves its output z, whose grad_fn is the node itself
        alive = weakref.ref(y)
    del y, z
    gc.collect()
    assert alive() is None


@pytest.mark.parametrize("preset", ["llama-tiny", "deepseek-v3-tiny", "deepseek-v4-tiny"])
def test_model_gradients_are_bit_identical_with_recomputed_norm_outputs(preset, monkeypatch):
    from nanoseek.model import transformer

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset)
    model = Transformer(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 24))

    def grads():
        out = model(ids, ids, return_logits=False)
        loss = out.loss + sum(out.aux.values())
        return torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)

    recomputed = grads()
    monkeypatch.setitem(transformer.KERNEL_FUNCTIONS, "training_forward", contextlib.nullcontext)
    kept = grads()
    assert sum(g is not None for g in kept) > 10
    for a, b in zip(recomputed, kept):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_an_in_place_edit_of_a_norm_output_is_kept_not_recomputed():
    from nanoseek.kernels.norm import recomputed_norm_outputs

    torch.manual_seed(0)
    norm, linear = FusedRMSNorm(8), torch.nn.Linear(8, 4)
    x = torch.randn(5, 8, requires_grad=True)
    grads = []
    for recompute in (False, True):
        with recomputed_norm_outputs() if recompute else contextlib.nullcontext():
            h = norm(x).mul_(2)  # then saved by the linear: must be the edited values
            y = linear(h)
        grads.append(torch.autograd.grad(y.square().sum(), (x, linear.weight)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_recomputed_norm_outputs_leaves_the_callers_saved_tensor_hooks_alone():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("llama-tiny")).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(1) or t, lambda t: t):
        loss = model(ids, ids, return_logits=False).loss
    assert len(packed) > 10  # every saved tensor still reaches the outer hook
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_swiglu_mlp_with_no_rows_gives_zero_weight_gradients():
    from nanoseek.kernels.swiglu import FusedSwiGLU as SwiGLU

    mlp = SwiGLU(8, 6, bias=True)
    mlp(torch.randn(0, 8, requires_grad=True)).sum().backward()
    for p in mlp.parameters():
        assert p.grad is not None and not p.grad.any()


def test_bf16_weight_gradients_sum_their_row_chunks_in_fp32(monkeypatch):
    """Many row chunks: the weight gradients stay as close to fp64 as one bf16 matmul's."""
    from nanoseek.kernels import swiglu as ffn

    monkeypatch.setattr(ffn, "BACKWARD_ROWS", 64)
    torch.manual_seed(0)
    mlp = ffn.FusedSwiGLU(32, 16)
    x = torch.randn(8192, 32)
    grads = {}
    for dtype in (torch.float64, torch.bfloat16):
        model = ffn.FusedSwiGLU(32, 16).to(dtype)
        model.load_state_dict(mlp.state_dict())
        model(x.to(dtype)).float().square().mean().backward()
        grads[dtype] = [p.grad.double() for p in model.parameters()]
    for exact, got in zip(grads[torch.float64], grads[torch.bfloat16]):
        assert ((got - exact).abs().max() / exact.abs().max()).item() < 6e-3


# ---------------------------------------------------------------------------- fast path == reference


def assert_near(got, want, dtype):
    """fp32: elementwise within 1e-5; bf16: within 2% of the largest magnitude (sums of many bf16
    products round differently when one side accumulates in fp32)."""
    if dtype == torch.bfloat16:
        assert got.dtype == want.dtype
        assert (got.float() - want.float()).abs().max() <= 2e-2 * want.float().abs().max() + 1e-3
    else:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rmsnorm_equals_the_reference(dtype):
    from nanoseek.model.norm import RMSNorm

    torch.manual_seed(0)
    ref = RMSNorm(16)
    with torch.no_grad():
        ref.weight.normal_()
    fast = FusedRMSNorm(16)
    fast.load_state_dict(ref.state_dict())
    x = (torch.randn(3, 5, 16) * 3).to(dtype).requires_grad_()
    assert fast(x).grad_fn.name().startswith("RMSNormFunction")
    tol = TOLERANCE[dtype] if dtype == torch.bfloat16 else dict(atol=1e-6, rtol=1e-6)
    want, got = ref(x), fast(x)
    torch.testing.assert_close(got, want, **tol)
    dy = torch.randn(want.shape).to(dtype)
    ref_grads = torch.autograd.grad(want, (x, ref.weight), dy)
    fast_grads = torch.autograd.grad(got, (x, fast.weight), dy)
    for a, b in zip(ref_grads, fast_grads):
        assert_near(b, a, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recomputed_norm_outputs_give_the_reference_gradients(dtype):
    from nanoseek.kernels.norm import recomputed_norm_outputs
    from nanoseek.model.norm import RMSNorm

    torch.manual_seed(0)
    ref, linear = RMSNorm(16).to(dtype), torch.nn.Linear(16, 8).to(dtype)
    fast = FusedRMSNorm(16).to(dtype)
    x = torch.randn(4, 3, 16, dtype=dtype, requires_grad=True)
    want = linear(ref(x)).float().square().sum()
    with recomputed_norm_outputs():
        got = linear(fast(x)).float().square().sum()
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got, want, **tol)
    for a, b in zip(
        torch.autograd.grad(want, (x, ref.weight, linear.weight)),
        torch.autograd.grad(got, (x, fast.weight, linear.weight)),
    ):
        assert_near(b, a, dtype)


def twin_ffns(bias: bool, limit=None, dtype=torch.float32):
    from nanoseek.kernels.swiglu import FusedSwiGLU
    from nanoseek.model.ffn import SwiGLU

    torch.manual_seed(0)
    ref = SwiGLU(16, 24, bias=bias, limit=limit).to(dtype)
    fast = FusedSwiGLU(16, 24, bias=bias, limit=limit).to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("limit", [None, 0.5])
def test_fused_swiglu_equals_the_reference(dtype, bias, limit):
    ref, fast = twin_ffns(bias, limit, dtype)
    x = torch.randn(3, 7, 16, dtype=dtype, requires_grad=True)
    want, got = ref(x), fast(x)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got, want, **tol)
    dy = torch.randn(want.shape).to(dtype)
    for a, b in zip(
        torch.autograd.grad(want, [x, *ref.parameters()], dy), torch.autograd.grad(got, [x, *fast.parameters()], dy)
    ):
        assert_near(b, a, dtype)


def test_fused_swiglu_under_bf16_autocast_equals_the_reference():
    ref, fast = twin_ffns(bias=True)
    x = torch.randn(2, 5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = ref(x), fast(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    for a, b in zip(
        torch.autograd.grad(want.float().sum(), [x, *ref.parameters()]),
        torch.autograd.grad(got.float().sum(), [x, *fast.parameters()]),
    ):
        assert_near(b, a, torch.bfloat16)


def test_forward_hooks_on_the_reference_swiglu_linears_run():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("llama-tiny", kernels=False)).train()
    seen = []
    model.layers[0].mlp.down_proj.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    model.layers[0].mlp.gate_up_proj.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    ids = torch.randint(0, 128, (2, 6))
    model(ids, ids).loss.backward()
    assert len(seen) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_down_dense_equals_the_reference(dtype):
    from nanoseek.kernels.swiglu import swiglu_down
    from nanoseek.model.ffn import swiglu

    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn(300, 16, generator=g).to(dtype).requires_grad_()  # two row chunks
    w = torch.randn(4, 8, generator=g).to(dtype).requires_grad_()
    b = torch.randn(4, generator=g).to(dtype).requires_grad_()
    s = torch.rand(300, generator=g).to(dtype).requires_grad_()
    want = F.linear(swiglu(*gate_up.chunk(2, dim=-1)) * s[:, None], w, b)
    got = swiglu_down(gate_up, w, b, row_scale=s)
    assert got.grad_fn.name().startswith("SwiGLUDownFunction")
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got, want, **tol)
    dy = torch.randn(want.shape, generator=g).to(dtype)
    for a, b_ in zip(
        torch.autograd.grad(want, (gate_up, w, b, s), dy), torch.autograd.grad(got, (gate_up, w, b, s), dy)
    ):
        assert_near(b_, a, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_cross_entropy_equals_the_reference(dtype, monkeypatch):
    from nanoseek.kernels import cross_entropy
    from nanoseek.model import loss

    monkeypatch.setattr(cross_entropy, "chunk_rows", lambda vocab: 64)  # 3 chunks
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 75, 16, generator=g).to(dtype).requires_grad_()
    w = torch.randn(40, 16, generator=g).to(dtype).requires_grad_()
    y = torch.randint(0, 40, (2, 75), generator=g)
    y[:, ::7] = -1
    want, got = loss.linear_cross_entropy(h, w, y), cross_entropy.linear_cross_entropy(h, w, y)
    tol = TOLERANCE[dtype] if dtype == torch.bfloat16 else dict(atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got, want, **tol)
    for a, b in zip(torch.autograd.grad(3 * want, (h, w)), torch.autograd.grad(3 * got, (h, w))):
        assert_near(b, a, dtype)


def twin_experts(dtype=torch.float32, limit=None):
    from nanoseek.kernels.grouped_mm import GroupedExperts
    from nanoseek.model.moe import RoutedExperts

    torch.manual_seed(0)
    ref = RoutedExperts(4, 16, 8, limit).to(dtype)
    torch.nn.init.normal_(ref.gate_up_proj, 0, 0.3)
    torch.nn.init.normal_(ref.down_proj, 0, 0.3)
    fast = GroupedExperts(4, 16, 8, limit).to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gathered", [False, True])
@pytest.mark.parametrize("limit", [None, 0.5])
def test_grouped_experts_equal_the_reference_loop(dtype, gathered, limit):
    ref, fast = twin_experts(dtype, limit)
    counts = torch.tensor([3, 0, 5, 2])  # an expert without rows too
    rows = torch.tensor([0, 1, 2, 0, 3, 4, 5, 1, 5, 2]) if gathered else None
    x = torch.randn(6 if gathered else 10, 16, dtype=dtype, requires_grad=True)
    w = torch.rand(10, dtype=dtype, requires_grad=True)
    want, got = ref(x, counts, w, rows), fast(x, counts, w, rows)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got, want, **tol)
    dy = torch.randn(want.shape).to(dtype)
    wrt_ref, wrt_fast = (x, w, ref.gate_up_proj, ref.down_proj), (x, w, fast.gate_up_proj, fast.down_proj)
    for a, b in zip(torch.autograd.grad(want, wrt_ref, dy), torch.autograd.grad(got, wrt_fast, dy)):
        assert_near(b, a, dtype)


def test_grouped_matmul_equals_per_expert_products():
    from nanoseek.kernels.grouped_mm import grouped_matmul

    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([2, 0, 3])
    x = torch.randn(5, 8, generator=g, requires_grad=True)
    w = torch.randn(3, 4, 8, generator=g, requires_grad=True)
    want = torch.cat([p @ w[e].T for e, p in enumerate(x.split(counts.tolist()))])
    got = grouped_matmul(x, w, counts)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    dy = torch.randn(want.shape, generator=g)
    for a, b in zip(torch.autograd.grad(want, (x, w), dy), torch.autograd.grad(got, (x, w), dy)):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("counts", [[3, 0, 17, 40, 1], [0, 0, 5, 0], [70, 0, 0, 30]])
@pytest.mark.parametrize("form", ["rows", "contraction"])
def test_bucketed_grouped_mm_equals_torchs_grouped_mm_exactly(counts, form):
    """Inputs in {-1, 0, 1} and at most 70 terms per sum: every product and partial sum is exact in
    fp32 accumulation and every total (an integer below 256) is exact in bf16, so the windows' extra rows (dropped
    outputs, zeroed terms) must change nothing, bit for bit."""
    from nanoseek.kernels.grouped_gemm import grouped_mm, uses_buckets

    g = torch.Generator().manual_seed(0)
    m = sum(counts)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)

    def ternary(*shape):
        return torch.randint(-1, 2, shape, generator=g).to(torch.bfloat16)

    if form == "rows":  # (M, K) x (E, K, N), the weight a transposed view as the experts pass it
        a, b = ternary(m, 32), ternary(len(counts), 24, 32).transpose(1, 2)
    else:  # (K, M) x (M, N): a weight gradient, a = dy^T a transposed view
        a, b = ternary(m, 24).T, ternary(m, 32)
    assert uses_buckets(a)
    want = torch._grouped_mm(a, b, offs=offs)
    assert torch.equal(grouped_mm(a, b, offs), want)
    assert torch.equal(grouped_mm(a.float(), b.float(), offs), want.float())  # fp32: torch's op


def test_bucketed_grouped_mm_rounds_rows_up_by_at_most_a_quarter():
    from nanoseek.kernels.grouped_gemm import MIN_BUCKET, bucket

    sizes = [bucket(n) for n in range(1, 5000)]
    assert all(max(n, MIN_BUCKET) <= p <= max(1.25 * n, MIN_BUCKET) for n, p in zip(range(1, 5000), sizes))
    assert len(set(sizes)) <= 4 * 9 + 1  # 4 per octave above 16


@pytest.mark.parametrize("limit", [None, 0.5])  # 0.5: V4's clamp, the grouped products under autograd
def test_grouped_experts_in_bf16_with_buckets_equal_torchs_grouped_mm(monkeypatch, limit):
    """The routed experts' forward and backward under bf16 autocast, bucketed against torch's op."""
    import nanoseek.kernels.grouped_gemm as gg

    _, fast = twin_experts(torch.float32, limit)
    calls = []
    original = gg.BucketedRowsMM.apply
    monkeypatch.setattr(gg.BucketedRowsMM, "apply", lambda *a: calls.append(1) or original(*a))
    counts = torch.tensor([19, 0, 40, 7])
    rows = torch.randint(0, 30, (66,), generator=torch.Generator().manual_seed(2))
    x = torch.randn(30, 16, requires_grad=True)
    w = torch.rand(66, requires_grad=True)
    results = []
    for buckets in (True, False):
        monkeypatch.setattr(gg, "BUCKETED_DTYPES", (torch.bfloat16,) if buckets else ())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fast(x, counts, w, rows)
        grads = torch.autograd.grad(y.float().square().sum(), (x, w, fast.gate_up_proj, fast.down_proj))
        results.append((y, *grads))
    for got, want in zip(*results):
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)
    assert bool(calls) == (limit is not None)


# ---------------------------------------------------------------------------- whole models


def twin_models(preset: str, **kw):
    torch.manual_seed(0)
    fast = Transformer(ModelConfig.from_preset(preset, **kw)).train()
    ref = Transformer(ModelConfig.from_preset(preset, kernels=False, **kw)).train()
    ref.load_state_dict(fast.state_dict())
    return ref, fast


def test_kernels_swap_module_classes_and_keep_the_state_dict():
    from nanoseek.kernels.grouped_mm import GroupedExperts
    from nanoseek.kernels.swiglu import FusedSwiGLU

    ref, fast = twin_models("deepseek-v3-tiny")
    kinds = {type(m) for m in fast.modules()}
    assert {FusedRMSNorm, FusedSwiGLU, GroupedExperts} <= kinds
    assert not kinds & {FusedRMSNorm, FusedSwiGLU, GroupedExperts} - {type(m) for m in ref.modules()} - kinds
    assert not {FusedRMSNorm, FusedSwiGLU, GroupedExperts} & {type(m) for m in ref.modules()}
    assert list(ref.state_dict()) == list(fast.state_dict())
    fast.set_kernels(False)
    assert not {FusedRMSNorm, FusedSwiGLU, GroupedExperts} & {type(m) for m in fast.modules()}


@pytest.mark.parametrize("preset", ["llama-tiny", "deepseek-v3-tiny", "deepseek-v4-tiny"])
@pytest.mark.parametrize("return_logits", [False, True])
def test_model_with_kernels_equals_the_reference_model(preset, return_logits):
    ref, fast = twin_models(preset)
    ids = torch.randint(0, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    losses, grads = [], []
    for model in (ref, fast):
        out = model(ids, ids, return_logits=return_logits)
        loss = out.loss + sum(out.aux.values())
        losses.append(loss.detach())
        grads.append(
            dict(
                zip(
                    [n for n, _ in model.named_parameters()],
                    torch.autograd.grad(loss, list(model.parameters()), allow_unused=True),
                )
            )
        )
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
    assert sum(g is not None for g in grads[0].values()) > 10
    for name, want in grads[0].items():
        got = grads[1][name]
        assert (want is None) == (got is None), name
        if want is not None:
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("preset", ["llama-tiny", "deepseek-v3-tiny"])
def test_model_with_kernels_equals_the_reference_model_in_bf16(preset):
    ref, fast = twin_models(preset)
    ids = torch.randint(0, ref.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    losses, grads = [], []
    for model in (ref, fast):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, ids, return_logits=False).loss
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, list(model.parameters()), allow_unused=True))
    torch.testing.assert_close(losses[1], losses[0], atol=1e-2, rtol=1e-2)
    for want, got in zip(*grads):
        if want is not None:
            assert (got - want).abs().max() <= 3e-2 * want.abs().max() + 1e-4


def test_kernels_are_an_option_not_in_the_hf_config():
    from nanoseek.config import build_train_config
    from nanoseek.errors import NanoseekError
    from nanoseek.io.hf import config_to_hf

    cfg = build_train_config(preset="llama-tiny", overrides={"model.kernels": False})
    assert cfg.model.kernels is False
    assert Transformer(cfg.model).kernels is False
    assert ModelConfig.from_preset("llama-tiny").kernels is True
    assert "kernels" not in config_to_hf(cfg.model)
    assert ModelConfig.from_dict(cfg.model.to_dict()) == cfg.model
    with pytest.raises(NanoseekError, match="kernels"):
        ModelConfig.from_preset("llama-tiny", kernels="yes")


# ---------------------------------------------------------------------------- block-sparse tiles (NSA's selected
# and window branches)


def picked_mask(blocks, valid, start: int, t: int, s: int, block: int, window=None):
    """(B, G, T, S) bool: key s visible to query t of block t // block per the picks, causal, in the window."""
    b, g, nq, k = blocks.shape
    first = start // block
    query_pos = torch.arange(start, start + t)
    key_pos = torch.arange(s)
    chosen = torch.zeros(b, g, nq, -(-s // block) + 1, dtype=torch.bool)
    chosen.scatter_(-1, blocks.masked_fill(~valid, chosen.shape[-1] - 1), True)
    mask = chosen[:, :, query_pos // block - first][..., key_pos // block] & (key_pos <= query_pos[:, None])
    if window is not None:
        mask &= key_pos > query_pos[:, None] - window
    return mask


def masked_attention(q, k, v, mask, scale):
    """softmax over the mask's keys in q's dtype, grouped heads repeated; rows that see nothing give 0."""
    r = q.shape[1] // k.shape[1]
    mask = mask.repeat_interleave(r, dim=1)
    logits = q @ k.repeat_interleave(r, dim=1).transpose(-1, -2) * scale
    probs = logits.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)
    return probs @ v.repeat_interleave(r, dim=1)


def block_inputs(start: int, t: int, dtype=torch.float64, heads=6, groups=2, d_v=3):
    g = torch.Generator().manual_seed(0)
    s = start + t
    q = torch.randn(2, heads, t, 5, generator=g).to(dtype).requires_grad_()
    k = torch.randn(2, groups, s, 5, generator=g).to(dtype).requires_grad_()
    v = torch.randn(2, groups, s, d_v, generator=g).to(dtype).requires_grad_()
    return q, k, v


def random_picks(start: int, t: int, block: int, n_picks: int, groups=2, seed=1):
    """Distinct key blocks per query block (some after the query block: hidden by causality), about a
    quarter of them invalid."""
    g = torch.Generator().manual_seed(seed)
    first, last = start // block, (start + t - 1) // block
    n_blocks = -(-(start + t) // block)
    nq = last - first + 1
    blocks = torch.rand(2, groups, nq, n_blocks, generator=g).argsort(-1)[..., :n_picks]
    valid = torch.rand(2, groups, nq, n_picks, generator=g) > 0.25
    return blocks, valid


@pytest.mark.parametrize("tile_bytes", [1, 1200, 8 << 20])  # 1 tile per chunk (fp64: 1,152 bytes each), 2, all
@pytest.mark.parametrize("start,t,window", [(0, 23, None), (6, 17, None), (9, 16, 7), (0, 40, 5)])
def test_block_sparse_attention_equals_masked_softmax(monkeypatch, start, t, window, tile_bytes):
    """Values and gradients against a dense softmax over the picked keys (fp64, grouped heads, partial
    first and last query blocks, invalid picks, rows that see no key; tiles one, two or all per chunk)."""
    from nanoseek.kernels import block_attention as tiles

    monkeypatch.setattr(tiles, "TILE_BYTES", tile_bytes)
    q, k, v = block_inputs(start, t)
    blocks, valid = random_picks(start, t, 4, 3)
    mask = picked_mask(blocks, valid, start, t, start + t, 4, window)
    assert (~mask.any(-1)).any(), "no query without a visible key: the blind rows go untested"
    want = masked_attention(q, k, v, mask, 0.4)
    got = tiles.block_sparse_attention(q, k, v, blocks, valid, start, 4, 0.4, window)
    weight = torch.randn(got.shape, dtype=got.dtype, generator=torch.Generator().manual_seed(2))
    grads_want = torch.autograd.grad((want * weight).sum(), (q, k, v))
    grads_got = torch.autograd.grad((got * weight).sum(), (q, k, v))
    for a, b in zip((got, *grads_got), (want, *grads_want)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_block_sparse_attention_computes_only_the_blocks_used(monkeypatch):
    """With `used`, a chunk computes its tiles' leading key blocks only: the same values and gradients
    as with every block computed and the unused ones invalid; and the products really shrink."""
    from nanoseek.kernels import block_attention as tiles

    monkeypatch.setattr(tiles, "TILE_BYTES", 1)
    q, k, v = block_inputs(0, 40)
    blocks, valid = random_picks(0, 40, 4, 4, seed=3)
    used = torch.randint(1, 5, blocks.shape[:3], generator=torch.Generator().manual_seed(4))
    keep = valid & (torch.arange(4) < used[..., None])
    keys = []  # the logits' widths, Q K^T being the forward's only TileProducts call
    product = tiles.TILE_PRODUCTS.forward
    monkeypatch.setattr(
        tiles.TILE_PRODUCTS, "forward", lambda a, b, out=None: keys.append(b.shape[-1]) or product(a, b, out)
    )
    results = []
    for kw in (dict(used=used), dict()):
        out = tiles.block_sparse_attention(q, k, v, blocks, keep, 0, 4, 0.4, **kw)
        widths, keys[:] = sorted(set(keys)), []
        results.append([out, *torch.autograd.grad(out.square().sum(), (q, k, v))])
        assert widths == ([4, 8, 12, 16] if kw else [16])  # 1 to 4 blocks of 4 keys where used says so
        keys.clear()
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_block_sparse_attention_passes_gradcheck():
    from nanoseek.kernels.block_attention import block_sparse_attention

    q, k, v = block_inputs(3, 9, heads=2, groups=1)
    blocks, valid = random_picks(3, 9, 4, 2, groups=1)
    assert torch.autograd.gradcheck(lambda *x: block_sparse_attention(*x, blocks, valid, 3, 4, 0.7, 6), (q, k, v))


@pytest.mark.parametrize("start,t,window,tile", [(0, 50, 12, 4), (0, 50, 16, 16), (13, 30, 9, 8), (0, 7, 3, 4)])
def test_banded_block_attention_equals_the_sliding_window(start, t, window, tile):
    """Query block i over key blocks i - ceil(w / C) .. i: exactly model/attention/core.py's window."""
    from nanoseek.kernels.block_attention import banded_block_attention
    from nanoseek.model.attention.core import causal_attention

    q, k, v = block_inputs(start, t, dtype=torch.float32)
    want = causal_attention(q, k, v, start, 0.4, window=window)
    got = banded_block_attention(q, k, v, start, window, 0.4, tile)
    weight = torch.randn(got.shape, generator=torch.Generator().manual_seed(2))
    grads_want = torch.autograd.grad((want * weight).sum(), (q, k, v))
    grads_got = torch.autograd.grad((got * weight).sum(), (q, k, v))
    for a, b in zip((got, *grads_got), (want, *grads_want)):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def test_banded_block_attention_under_bf16_autocast_is_no_less_accurate_than_sdpa():
    """Under bf16 autocast (fp32 logits of the fp32 q, k; P V in bf16) the output and gradients are no
    further from fp64 than the reference's window under the same autocast (explicit_attention at these
    sizes); gradients come back in fp32. q and k rounded to bf16, or rowsum(dO * O) taken from the
    bf16 output, made dq and dk 1.6-2x worse."""
    from nanoseek.kernels.block_attention import banded_block_attention
    from nanoseek.model.attention.core import causal_attention

    q, k, v = block_inputs(0, 96, dtype=torch.float32, heads=4, groups=1, d_v=5)
    exact = causal_attention(*(x.double() for x in (q, k, v)), 0, 0.4, window=20)
    weight = torch.randn(exact.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want = [exact, *torch.autograd.grad((exact * weight).sum(), (q, k, v))]
    errors = []
    reference, tiles = (
        (lambda *x: causal_attention(*x, 0, 0.4, window=20)),
        (lambda *x: banded_block_attention(*x, 0, 20, 0.4, 16)),
    )
    for fn in (reference, tiles):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(q, k, v)
        grads = torch.autograd.grad((out.double() * weight).sum(), (q, k, v))
        assert [g.dtype for g in grads] == [torch.float32] * 3
        errors.append([(a.double() - b.double()).abs().max().item() for a, b in zip((out, *grads), want)])
    sdpa_errors, tile_errors = errors
    assert all(e < 0.05 for e in tile_errors), tile_errors
    assert all(mine <= 1.1 * theirs + 1e-4 for mine, theirs in zip(tile_errors, sdpa_errors)), errors


@pytest.mark.parametrize(
    "preset,kw",
    [
        ("llama-tiny", dict(num_key_value_heads=1)),  # MQA: 4 heads fold into 256-row tiles
        ("llama-tiny", dict()),  # GQA 4 over 2: tiles only with MIN_TILE_ROWS lowered
        ("deepseek-v3-tiny", dict(num_nextn_predict_layers=0)),  # MLA
    ],
)
def test_sliding_window_models_with_tiles_equal_the_reference_model(monkeypatch, preset, kw):
    """A sliding-window model's loss and every gradient, and a prefill after cached tokens (start not a
    multiple of the tile), with the window's tiles against the reference's banded SDPA."""
    from nanoseek.kernels import block_attention as tiles

    monkeypatch.setattr(tiles, "MIN_TILE_ROWS", 0)
    monkeypatch.setattr(tiles, "WINDOW_TILE", 4)
    calls = []
    original = tiles.banded_block_attention
    monkeypatch.setattr(tiles, "banded_block_attention", lambda *a: calls.append(1) or original(*a))
    ref, model = twin_models(preset, sparse="sliding", sliding_window=6, **kw)
    ids = torch.randint(0, ref.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    assert_same_loss_and_gradients(ref, model, ids, grad_atol=2e-6)
    assert calls, "the tiles did not run"
    assert_same_cached_prefill(ref, model, ids)


def test_sliding_window_keeps_sdpa_where_tiles_do_not_pay():
    """One query head per key head (64-row tiles) keeps the reference's SDPA; four heads on one key head
    (256 rows) run the tiles."""
    from nanoseek.kernels import block_attention as tiles

    q, k, v = block_inputs(0, 40, dtype=torch.float32, heads=2, groups=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiles, "banded_block_attention", lambda *a: pytest.fail("tiles ran"))
        tiles.sliding_window_attention(q, k, v, 0, 8, 0.4)
    q4, k1, v1 = block_inputs(0, 40, dtype=torch.float32, heads=4, groups=1)
    ran = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiles, "banded_block_attention", lambda *a: ran.append(1) or q4)
        tiles.sliding_window_attention(q4, k1, v1, 0, 8, 0.4)
    assert ran


@pytest.mark.parametrize(
    "preset,kw,layer",
    [
        ("llama-tiny", dict(num_key_value_heads=1, sparse="sliding", sliding_window=6), 0),
        ("deepseek-v4-tiny", dict(), 1),  # HCA
    ],
)
def test_window_tiles_step_aside_for_dropout_and_a_distance_bias(monkeypatch, preset, kw, layer):
    """Dropout in training and a distance bias (ALiBi) keep the reference's SDPA; in eval the same
    layer runs the tiles (HCA: without the C++ kernel; with it HCA gathers, below)."""
    from nanoseek.kernels import block_attention as tiles
    from nanoseek.kernels import csa as v4

    monkeypatch.setattr(v4, "native_ops", lambda q: None)
    calls = []
    original = tiles.block_sparse_attention
    monkeypatch.setattr(tiles, "block_sparse_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(v4, "block_sparse_attention", tiles.block_sparse_attention)
    ids = torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(1))
    model = Transformer(ModelConfig.from_preset(preset, attention_dropout=0.1, **kw)).train()
    model(ids, ids)
    assert not calls, "the tiles ran under dropout"
    model.eval()(ids)
    assert calls, "the tiles did not run in eval"
    if preset == "llama-tiny":
        calls.clear()
        alibi = Transformer(ModelConfig.from_preset(preset, position="alibi", **kw)).eval()
        alibi(ids)
        assert not calls, "the tiles ran with a distance bias"


def test_hca_gathers_in_eval_and_training_but_not_under_dropout(monkeypatch):
    """With the C++ kernel an HCA layer gathers its window and entries in eval and in training without
    attention dropout; with dropout it keeps the reference's SDPA (the kernel has no dropout)."""
    from nanoseek.kernels import csa as v4

    assert v4.native_ops(torch.zeros(1)) is not None, "the C++ kernel did not build (see the warning)"
    calls = []
    original = v4.SparseCompressedAttention.attend_every_entry
    monkeypatch.setattr(v4.SparseCompressedAttention, "attend_every_entry", lambda *a: calls.append(1) or original(*a))
    ids = torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(1))
    for dropout, expected in ((0.1, False), (0.0, True)):
        calls.clear()
        Transformer(ModelConfig.from_preset("deepseek-v4-tiny", attention_dropout=dropout)).train()(ids, ids)
        assert bool(calls) == expected, f"attention dropout {dropout}"
    calls.clear()
    Transformer(ModelConfig.from_preset("deepseek-v4-tiny", attention_dropout=0.1)).eval()(ids)
    assert calls


# ---------------------------------------------------------------------------- NSA compressed branch


def nsa_inputs(start: int, t: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    n = (start + t) // 4  # blocks of 4 tokens
    q = torch.randn(2, 6, t, 5, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(2, 2, n, w, generator=g).to(dtype).requires_grad_() for w in (5, 3))
    return q, k, v


def values_and_grads(fn, q, k, v, start: int):
    out, probs = fn(q, k, v, start, 4, 0.4, True)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    return [out.float(), probs, *torch.autograd.grad((out.float() * weight).sum(), (q, k, v))]


@pytest.mark.parametrize("start,t,chunk", [(0, 23, 1024), (0, 23, 5), (6, 11, 4), (9, 1, 1024), (0, 3, 1024)])
def test_nsa_compressed_block_attention_equals_the_reference(monkeypatch, start, t, chunk):
    """In chunks (each over the blocks its last query sees), p recomputed in backward: the plain
    softmax's values, selection scores and gradients (also before any block completes)."""
    from nanoseek.kernels import nsa as fast
    from nanoseek.model.attention.nsa import compressed_block_attention

    monkeypatch.setattr(fast, "CMP_CHUNK", chunk)
    q, k, v = nsa_inputs(start, t)
    want = values_and_grads(compressed_block_attention, q, k, v, start)
    got = values_and_grads(fast.CompressedBlockAttention.apply, q, k, v, start)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_nsa_compressed_block_attention_under_bf16_autocast_equals_the_reference(monkeypatch):
    """Under autocast both run their matmuls in bf16; gradients come back in the inputs' fp32."""
    from nanoseek.kernels import nsa as fast
    from nanoseek.model.attention.nsa import compressed_block_attention

    monkeypatch.setattr(fast, "CMP_CHUNK", 8)
    q, k, v = nsa_inputs(0, 37)
    results = []
    for fn in (compressed_block_attention, fast.CompressedBlockAttention.apply):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(values_and_grads(fn, q, k, v, 0))
    assert [r.dtype for r in results[1][2:]] == [torch.float32] * 3
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("topn", [3, 64])  # blocks chosen by the compressed scores / every block (no selection)
def test_nsa_model_with_kernels_equals_the_reference_model(topn):
    from nanoseek.kernels.nsa import ChunkedNativeSparseAttention

    ref, fast = twin_models("llama-tiny", sparse="nsa", nsa_block=4, nsa_topn=topn, sliding_window=6)
    assert isinstance(fast.layers[0].self_attn, ChunkedNativeSparseAttention)
    assert not isinstance(ref.layers[0].self_attn, ChunkedNativeSparseAttention)
    ids = torch.randint(0, ref.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
    assert_same_loss_and_gradients(ref, fast, ids, grad_atol=1e-6)


def assert_same_loss_and_gradients(ref, fast, ids, grad_atol: float):
    """The language-model loss on ids and every parameter's gradient, fast model against reference."""
    losses, grads = [], []
    for model in (ref, fast):
        loss = model(ids, ids, return_logits=False).loss
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
    for (name, _), got, want in zip(ref.named_parameters(), grads[1], grads[0]):
        torch.testing.assert_close(got, want, atol=grad_atol, rtol=1e-5, msg=name)


def assert_same_cached_prefill(ref, fast, ids, start: int = 13):
    """The logits of ids[:, start:] prefilled after ids[:, :start] went through the cache, fast model
    against reference (both put in eval mode)."""
    with torch.no_grad():
        logits = []
        for m in (ref.eval(), fast.eval()):
            cache = m.make_cache(ids.shape[0], ids.shape[1] + 3)
            m(ids[:, :start], cache=cache, start=0)
            logits.append(m(ids[:, start:], cache=cache, start=start).logits)
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("query_group,n_kv_heads", [(1, 2), (2, 1), (1, 4)])
def test_nsa_model_with_gathered_selection_equals_the_reference_model(query_group, n_kv_heads):
    """Query groups smaller than a block: the selected branch through the gathered kernel (per query
    picked tokens) against the reference's masked SDPA; loss and every gradient, and a prefill after
    cached tokens."""
    from nanoseek.kernels import nsa as fast

    kw = dict(sparse="nsa", nsa_block=4, nsa_topn=4, sliding_window=6, nsa_query_group=query_group)
    ref, model = twin_models("llama-tiny", num_key_value_heads=n_kv_heads, **kw)
    calls = []
    original = fast.GatheredAttention.apply
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fast.GatheredAttention, "apply", lambda *a: calls.append(1) or original(*a))
        ids = torch.randint(0, ref.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
        assert_same_loss_and_gradients(ref, model, ids, grad_atol=2e-6)
        assert calls, "the gathered selection did not run"
        assert_same_cached_prefill(ref, model, ids)


# ---------------------------------------------------------------------------- DSA long-sequence path


def dsa_inputs(topk: int, b: int, g: int, start: int, t: int, d_v: int):
    """A tiny indexer and q (B, 4, T, 16), k (B, G, S, 16), v (B, G, S, d_v) after `start` cached tokens."""
    from nanoseek.model.attention.dsa import LightningIndexer

    torch.manual_seed(0)
    cfg = ModelConfig(
        hidden_size=32,
        num_attention_heads=4,
        attention="mla",
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        index_topk=topk,
        index_n_heads=16,  # many heads: no ReLU ties among the scores
        index_head_dim=16,
        sparse="dsa",
        max_position_embeddings=8,
    )
    indexer = LightningIndexer(cfg)
    s = start + t
    angles = torch.arange(s, dtype=torch.float32)[:, None] * torch.rand(4)
    cos, sin = angles.cos(), angles.sin()
    with torch.no_grad():
        keys = indexer.keys(torch.randn(b, s, 32), (cos, sin))
    x, q_latent = torch.randn(b, t, 32), torch.randn(b, t, 24)
    q = torch.randn(b, 4, t, 16, requires_grad=True)
    k = torch.randn(b, g, s, 16, requires_grad=True)
    v = torch.randn(b, g, s, d_v, requires_grad=True)
    return indexer, (x, q_latent, keys, (cos[start:], sin[start:]), start), q, k, v


@pytest.mark.parametrize(
    "topk,b,g,start,t,d_v,shared",
    [
        (40, 1, 1, 0, 300, 16, False),  # rows 0..38 have fewer causal keys than top-k
        (40, 2, 2, 0, 300, 8, False),  # batch, two key/value heads, values narrower than keys
        (40, 2, 1, 0, 300, 16, True),  # values = the keys' prefix (MLA's absorbed form)
        (40, 1, 2, 37, 300, 8, True),
        (280, 2, 1, 0, 513, 16, False),  # a dense first chunk, then masked or gathered chunks
        (280, 1, 2, 30, 600, 8, True),
    ],
)
@pytest.mark.parametrize("gather_from", [1, 2, 10_000])  # (ref, fast): gathered / mixed / masked chunks
@pytest.mark.parametrize("gathered_by", ["c++", "pytorch"])
def test_dsa_sparse_attention_equals_the_reference(
    monkeypatch, topk, b, g, start, t, d_v, shared, gather_from, gathered_by
):
    """kernels/dsa.py against model/attention/dsa.py's chunked path: values, gradients of q, k and v,
    none for the indexer; the gathered queries through the C++ kernel and through PyTorch."""
    from nanoseek.kernels import dsa as fast
    from nanoseek.model.attention import dsa as reference

    monkeypatch.setattr(reference, "GATHER_FROM", 1 if gather_from == 1 else 10_000)
    monkeypatch.setattr(fast, "GATHER_FROM", gather_from)
    if gathered_by == "pytorch":  # the gathers and the top-k
        monkeypatch.setattr(fast, "native_ops", lambda q: None)
        monkeypatch.setattr(fast, "native_topk", lambda scores: None)
    else:
        assert fast.native_ops(torch.zeros(1)) is not None, "the C++ kernel did not build (see the warning)"
        assert fast.native_topk(torch.zeros(1)) is not None, "the C++ top-k did not build (see the warning)"
    indexer, index_in, q, k, v = dsa_inputs(topk, b, g, start, t, d_v)
    weight = torch.randn(b, 4, t, d_v)
    inputs = (q, k) if shared else (q, k, v)
    results = []
    for fn, values in (
        (reference.chunked_sparse_attention, k[..., :d_v] if shared else v),
        (fast.sparse_attention, d_v if shared else v),
    ):
        out = fn(indexer, *index_in, q, k, values, 0.3)
        results.append([out, *torch.autograd.grad((out * weight).sum(), inputs)])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert all(p.grad is None for p in indexer.parameters())


@pytest.mark.parametrize(
    "start,t,b,gather_from,topk",
    [
        (0, 300, 2, 0, 4),  # every chunk gathers; rows 0..6 have fewer window keys than w
        (0, 600, 1, 20, 4),  # the first chunk (64 entries) by the reference's masked SDPA, the second gathers
        (37, 290, 1, 0, 4),  # a prefill after 37 cached tokens: keys and entries from the cache
        (0, 300, 2, 0, 64),  # chunk 0 sees 64 entries <= top-k: picks every visible one unscored
        (37, 290, 1, 0, 80),  # after the cache: chunk 0 sees 73 entries (unscored), chunk 1 81 (scored)
        (0, 300, 1, 0, 100),  # top-k above the 75 entries: none scored, picks 75 wide
    ],
)
def test_csa_gathered_prefill_equals_the_reference(monkeypatch, start, t, b, gather_from, topk):
    """kernels/csa.py against model/attention/compressed.py: a CSA layer's output and the gradients of
    its input and of every weight (sinks, kv, compressor, queries), fp32 on the CPU, in inference mode
    (the fast path's domain); the indexer gets no gradient through either."""
    from nanoseek.kernels import csa as fast
    from nanoseek.model.attention.compressed import CompressedAttention

    assert fast.native_ops(torch.zeros(1)) is not None, "the C++ kernel did not build (see the warning)"
    monkeypatch.setattr(fast, "GATHER_FROM", gather_from)
    cfg = ModelConfig.from_preset("deepseek-v4-tiny", index_topk=topk)
    torch.manual_seed(3)
    ref = CompressedAttention(cfg, 0).eval()
    with torch.no_grad():
        ref.sinks.normal_()  # the sink's logit matters
    quick = fast.SparseCompressedAttention(cfg, 0).eval()
    quick.load_state_dict(ref.state_dict())
    gathered = []  # the fast path really runs
    monkeypatch.setattr(
        quick, "attend_gathered", lambda *a: gathered.append(a[4]) or type(quick).attend_gathered(quick, *a)
    )
    x = torch.randn(b, start + t, cfg.hidden_size)
    results = [layer_output_and_grads(m, x, start, lambda n: "indexer" not in n) for m in (ref, quick)]
    assert gathered[-1] == (256 if gather_from == 20 else 0)  # the first query the prefill gathers
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def layer_output_and_grads(module, x, start: int, keep_param) -> list:
    """[output, d/dx, d/d each parameter whose name keep_param accepts (None where unused)] of one
    attention layer on x's last tokens, after its first `start` went through the cache."""
    b, s, _ = x.shape
    xi = x.clone().requires_grad_()
    if start:
        cache = module.make_cache(b, s, torch.float32, x.device)
        with torch.no_grad():
            module(x[:, :start], cache=cache, start=0)
        out = module(xi[:, start:], cache=cache, start=start)
    else:
        out = module(xi)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    params = [p for n, p in module.named_parameters() if keep_param(n)]
    return [out, *torch.autograd.grad((out * weight).sum(), [xi, *params], allow_unused=True)]


@pytest.mark.parametrize(
    "kind,start,t,b,training",
    [
        ("hca", 0, 150, 2, False),  # entries closing every 8 tokens; tiles of 4
        ("hca", 37, 90, 1, False),  # a prefill after 37 cached tokens: keys and entries from the cache
        ("hca", 0, 61, 2, True),  # training: the same loss gradients
        ("sliding", 0, 45, 1, False),  # a V4 sliding layer: window and sink only
    ],
)
@pytest.mark.parametrize(
    "path",
    [
        "tiles",  # a chunk of tiles per tile (each its own used blocks)
        "tiles-in-one-chunk",
        "gathered",  # HCA through the C++ gathered kernel (the default where it builds)
        "gathered-in-runs",  # its picks over several calls of 16 queries (PICKS_BYTES exceeded)
    ],
)
def test_v4_fast_paths_equal_the_reference(monkeypatch, kind, start, t, b, training, path):
    """kernels/csa.py's tiles (window blocks + the sink + the closed entries, each query block only as
    many entry blocks as it sees) and HCA's gathered attention (window + every closed entry, the sink
    in the kernel) against model/attention/compressed.py's chunked SDPA: an HCA (or V4 sliding)
    layer's output and the gradients of its input and every weight (sinks included)."""
    from nanoseek.kernels import block_attention as tiles
    from nanoseek.kernels import csa as fast
    from nanoseek.model.attention.compressed import CompressedAttention

    gathered = path.startswith("gathered")
    if gathered and kind != "hca":
        pytest.skip("only HCA gathers; V4's sliding layers run as tiles")
    assert fast.native_ops(torch.zeros(1)) is not None, "the C++ kernel did not build (see the warning)"
    if not gathered:  # without the C++ kernel HCA runs as tiles
        monkeypatch.setattr(fast, "native_ops", lambda q: None)
    if path == "gathered-in-runs":
        monkeypatch.setattr(fast, "PICKS_BYTES", 1)
        monkeypatch.setattr(fast, "CHUNK", 16)
    monkeypatch.setattr(fast, "V4_TILE", 4)
    monkeypatch.setattr(tiles, "TILE_BYTES", 1 if path == "tiles" else 8 << 20)
    layers = ["sliding", "hca"] if kind == "sliding" else None
    cfg = ModelConfig.from_preset("deepseek-v4-tiny", **({"sparse_layers": layers} if layers else {}))
    layer = 0 if kind == "sliding" else 1
    assert cfg.layer_sparse(layer) == kind
    torch.manual_seed(3)
    ref = CompressedAttention(cfg, layer).train(training)
    with torch.no_grad():
        ref.sinks.normal_()  # the sink's logit matters
    quick = fast.SparseCompressedAttention(cfg, layer).train(training)
    quick.load_state_dict(ref.state_dict())
    ran = []
    runs = "attend_picks" if gathered else "attend_tiles"
    monkeypatch.setattr(quick, runs, lambda *a: ran.append(1) or getattr(type(quick), runs)(quick, *a))
    x = torch.randn(b, start + t, cfg.hidden_size)
    results = [layer_output_and_grads(m, x, start, lambda n: True) for m in (ref, quick)]
    assert ran, f"{runs} did not run"
    assert path != "gathered-in-runs" or len(ran) > 2, "the picks went in one call"
    for got, want in zip(results[1], results[0]):
        if want is None:
            assert got is None
            continue
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind,topk", [("csa", 4), ("csa", 64), ("hca", 4)])  # 64: chunk 0 unscored
def test_v4_gathered_layers_under_bf16_autocast_are_as_accurate_as_the_reference(monkeypatch, kind, topk):
    """CSA's and HCA's gathered path under bf16 autocast (on AVX-512 BF16: the kernel's bf16 loops,
    P and dS rounded to bf16) against the float64 reference layer: output and the gradients of the
    input and the sinks no further from it than 2.5x the reference's own bf16 error (its softmax's
    products in fp32 from bf16 q and k, explicit_attention at these sizes)."""
    from nanoseek.kernels import csa as fast
    from nanoseek.kernels.native import bf16_kernels
    from nanoseek.model.attention.compressed import CompressedAttention

    if not bf16_kernels():
        pytest.skip("the kernel takes bf16 only where the CPU has AVX-512 BF16 (elsewhere HCA runs tiles)")
    cfg = ModelConfig.from_preset("deepseek-v4-tiny", index_topk=topk)
    layer = 0 if kind == "csa" else 1
    assert cfg.layer_sparse(layer) == kind
    torch.manual_seed(3)
    ref = CompressedAttention(cfg, layer).eval()
    with torch.no_grad():
        ref.sinks.normal_()
        if kind == "csa":  # every score 0: the earliest top-k entries in every precision (no pick flips)
            for p in ref.indexer.parameters():
                p.zero_()
    quick = fast.SparseCompressedAttention(cfg, layer).eval()
    quick.load_state_dict(ref.state_dict())
    ran = []
    runs = "attend_gathered" if kind == "csa" else "attend_every_entry"
    monkeypatch.setattr(quick, runs, lambda *a: ran.append(1) or getattr(type(quick), runs)(quick, *a))
    x = torch.randn(2, 300, cfg.hidden_size)
    keep = lambda n: n == "sinks"  # noqa: E731
    exact = CompressedAttention(cfg, layer).double().eval()
    exact.load_state_dict(ref.state_dict())
    want = layer_output_and_grads(exact, x.double(), 0, keep)
    errors = []
    for module in (ref, quick):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = layer_output_and_grads(module, x, 0, keep)
        errors.append([(a.double() - e).abs().max().item() / e.abs().max().item() for a, e in zip(got, want)])
    assert ran, f"{runs} did not run"
    ref_errors, fast_errors = errors
    assert all(e < 0.03 for e in fast_errors), errors
    assert all(mine <= 2.5 * theirs for mine, theirs in zip(fast_errors, ref_errors)), errors


def test_csa_gathered_prefill_under_bf16_autocast_picks_what_the_reference_picks(monkeypatch):
    """Under bf16 autocast with a random indexer, CSA's gathered prefill scores the entries in bf16 as
    the reference's indexer does, so both keep the same entries: outputs within bf16 rounding of each
    other (an entry picked by one and not the other moves a query's output by tens of percent)."""
    from nanoseek.kernels import csa as fast
    from nanoseek.kernels.native import bf16_kernels
    from nanoseek.model.attention.compressed import CompressedAttention

    if not bf16_kernels():
        pytest.skip("CSA gathers bf16 queries only where the kernel takes bf16 (AVX-512 BF16)")
    cfg = ModelConfig.from_preset("deepseek-v4-tiny")
    torch.manual_seed(5)
    ref = CompressedAttention(cfg, 0).eval()
    quick = fast.SparseCompressedAttention(cfg, 0).eval()
    quick.load_state_dict(ref.state_dict())
    ran = []
    monkeypatch.setattr(quick, "attend_gathered", lambda *a: ran.append(1) or type(quick).attend_gathered(quick, *a))
    x = torch.randn(2, 300, cfg.hidden_size)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = ref(x).float(), quick(x).float()
    assert ran, "the gathered path did not run"
    rows = ((got - want).abs().amax(-1) / want.abs().amax(-1)).flatten()
    assert rows.max() < 0.03, rows.max()


@pytest.mark.parametrize("autocast", [False, True])
def test_csa_chunk_scores_in_scratch_equal_the_indexers_scores(autocast):
    """CSA's indexer scores written into reused buffers are `Indexer.scores`' bit for bit, in fp32 and
    under bf16 autocast (where the reference's products run in bf16, and so do these)."""
    from nanoseek.kernels.csa import SparseCompressedAttention
    from nanoseek.kernels.dsa import Scratch

    cfg = ModelConfig.from_preset("deepseek-v4-tiny")
    attn = SparseCompressedAttention(cfg, 0).eval()
    x, entries = torch.randn(2, 70, cfg.hidden_size), torch.randn(2, 30, cfg.index_head_dim)
    q_latent = attn.q_a_norm(attn.q_a_proj(x))
    cos, sin = attn.rope(torch.arange(70))
    scratch = Scratch(x.device, 30)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for a, z, w in ((0, 40, 10), (40, 70, 30)):
            args = (x[:, a:z], q_latent[:, a:z]), (cos[a:z], sin[a:z]), entries[:, :w]
            got = attn.chunk_scores(*args[0], args[1], args[2], scratch)
            want = attn.indexer.scores(*args[0], *args[1], args[2])
            assert got.dtype == want.dtype == (torch.bfloat16 if autocast else torch.float32)
            assert torch.equal(got, want)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("dots_bytes", [1 << 20, 1 << 14])
def test_dsa_chunk_scores_in_scratch_equal_the_indexers_scores(monkeypatch, dots_bytes, autocast):
    """The scores written into reused buffers, a block of keys at a time, are the reference's (one
    product over every key), in fp32 and under bf16 autocast (both in bf16 there): bit for bit in one
    block; in several, to rounding (the BLAS may sum a product of another width in another order:
    ~1e-7 relative in fp32), chunk after chunk of growing width (a buffer sized once for the most
    keys, widths not multiples of 4 among them), and a chunk wider than that is refused."""
    from nanoseek.kernels import dsa as fast
    from nanoseek.kernels.dsa import Scratch, chunk_scores

    monkeypatch.setattr(fast, "DOTS_BYTES", dots_bytes)
    indexer, (x, q_latent, keys, (cos, sin), start), *_ = dsa_inputs(40, 2, 1, 0, 300, 16)
    scratch = Scratch(x.device, keys.shape[1])
    blocks = []
    tol = 2**-7 if autocast else 1e-6
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for a, z in ((0, 64), (64, 300), (256, 300), (0, 300), (0, 257), (200, 259)):
            blocks.append(len(fast.key_blocks(z, (z - a) * indexer.n_heads)))
            args = (x[:, a:z], q_latent[:, a:z], keys[:, :z], (cos[a:z], sin[a:z]))
            got, want = chunk_scores(indexer, *args, scratch), indexer.scores(*args)
            assert got.dtype == want.dtype == (torch.bfloat16 if autocast else torch.float32)
            if blocks[-1] == 1:
                assert torch.equal(got, want)
            else:
                torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    assert max(blocks) >= 4 and min(blocks) == 1  # the blocks apply (the last one 64 + the remainder wide)
    with pytest.raises(ValueError, match="more than the 300"):
        scratch.take("scores", (1, 8, 301))


@pytest.mark.parametrize("scores", ["normal", "rounded", "relu", "infinities"])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_indexer_topk_picks_what_earliest_topk_picks(scores, threads):
    """csrc/indexer_topk.cpp against the causal mask + `earliest_topk`: the same keys (ties at the
    k-th score to the earliest, -0.0 equal to 0.0, rows that see fewer than k keys), the same
    validity, in ascending order; k from 1 to every key, rows that see none to all; with a rate m
    (CSA's entries: row c sees (visible0 + c) // m keys) as with the mask of those counts."""
    from nanoseek.kernels.dsa import native_topk
    from nanoseek.model.attention.dsa import earliest_topk

    assert native_topk(torch.zeros(1)) is not None, "the C++ top-k did not build (see the warning)"
    gen = torch.Generator().manual_seed(11)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for b, c, s, k, visible0, rate in [
            (1, 5, 40, 1, 40, 1),
            (2, 7, 300, 37, 120, 1),
            (2, 3, 50, 50, 0, 1),
            (1, 9, 64, 20, 5, 1),
            (2, 13, 80, 9, 301, 4),  # every row sees at least 75 of 80
            (1, 11, 30, 6, 17, 4),  # rows see 4 .. 6 keys: fewer than k
        ]:
            x = torch.randn(b, c, s, generator=gen)
            if scores == "rounded":  # many ties at the k-th score
                x = x.round()
            elif scores == "relu":  # zeros, positive and negative weights, -0.0
                x = x.relu() * (torch.rand(b, c, 1, generator=gen) - 0.3)
            elif scores == "infinities":
                x[x > 1] = float("-inf")
                x[x < -1.5] = -0.0
                x[x.abs() < 0.05] = float("inf")
            picked, valid = native_topk(x).indexer_topk(x, visible0, k, rate)
            seen = (visible0 + torch.arange(c)) // rate  # keys each row sees
            masked = x.masked_fill(torch.arange(s) >= seen[:, None], float("-inf"))
            want = earliest_topk(masked, k)
            want_valid = masked.gather(-1, want) > float("-inf")
            rows = (t.view(-1, k).tolist() for t in (picked, valid, want, want_valid))
            for got_row, ok_row, want_row, want_ok in zip(*rows):
                assert got_row == sorted(got_row) and len(set(got_row)) == k
                assert dict(zip(got_row, ok_row)) == dict(zip(want_row, want_ok))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "b,h,g,s,x,d_v,shared,threads,t,n_picks,crowded",
    [
        (2, 4, 2, 40, 24, 16, True, 1, 7, 20, False),  # widths that leave tails after the 16-column blocks
        (1, 8, 1, 300, 64, 48, True, 2, 7, 70, False),  # backward split over two threads' dk
        (2, 6, 2, 50, 32, 20, False, 2, 7, 25, False),  # separate values, 3 heads a key head (a head block tail)
        (2, 6, 2, 50, 32, 20, True, 1, 7, 25, False),  # shared values, 3 heads: dk's 2 R = 6-deep sums
        # 320 picks of 1,280 keys 2,304 bytes wide: segments of 384 keys (4); 2 x 70 queries in blocks
        # of up to 64 queries (four blocks over two threads)
        (2, 2, 1, 1280, 576, 64, True, 2, 70, 320, False),
        # two key heads, each a block's own: segments of 2,304 keys (3)
        (2, 2, 2, 6000, 64, 48, True, 2, 70, 320, False),
        # CSA's kind of picks: a few among the first keys, most among the last 1,000 of 8,000 (a segment
        # reaching over the empty middle, short ones where the picks crowd)
        (1, 2, 1, 8000, 64, 48, True, 2, 70, 320, True),
    ],
)
def test_native_gathered_attention_equals_the_reference(b, h, g, s, x, d_v, shared, threads, t, n_picks, crowded):
    """The C++ kernel against model/attention/dsa.py's `gathered_attention` (float64): values and
    gradients of q, k and v, with invalid picks (a tile's valid picks packed), 70 picks (two tiles)
    and repeated picks; with more picks, rows whose picks spread over several key segments, in several
    blocks of queries. A query with no valid pick gets 0 and gives no gradient (the reference's softmax
    over nothing is NaN: there it keeps one pick and no output gradient)."""
    from nanoseek.kernels.dsa import GatheredAttention, native_ops
    from nanoseek.model.attention.dsa import gathered_attention

    assert native_ops(torch.zeros(1)) is not None, "the C++ kernel did not build (see the warning)"
    gen = torch.Generator().manual_seed(5)
    scale = 0.3 if x <= 64 else x**-0.5  # wide keys: logits of unit scale (sums of 576 products peak sharply)
    q = torch.randn(b, h, t, x, generator=gen, requires_grad=True)
    k = torch.randn(b, g, s, x, generator=gen, requires_grad=True)
    v = torch.randn(b, g, s, d_v, generator=gen, requires_grad=True)
    picked = torch.stack([torch.randperm(s, generator=gen)[:n_picks] for _ in range(b * t)]).view(b, t, n_picks)
    if crowded:  # 8 picks among the first 64 keys, the rest among the last 1,000
        last = torch.stack([torch.randperm(1000, generator=gen)[: n_picks - 8] for _ in range(b * t)])
        picked = torch.cat([torch.randint(0, 64, (b, t, 8), generator=gen), s - 1000 + last.view(b, t, -1)], dim=-1)
    picked[:, ::2, 1] = picked[:, ::2, 0]  # a key picked twice counts twice
    valid = torch.rand(b, t, n_picks, generator=gen) > 0.3
    valid[..., 0] = True  # every query keeps at least one pick, but query 3 below
    weight = torch.randn(b, h, t, d_v, generator=gen, dtype=torch.float64)
    weight[:, :, 3] = 0.0
    blind = valid.clone()
    blind[:, 3] = False
    inputs = (q, k) if shared else (q, k, v)
    want_out = gathered_attention(
        *(a.double() for a in (q, k)), (k[..., :d_v] if shared else v).double(), picked, valid, scale
    )
    want = [want_out, *torch.autograd.grad((want_out * weight).sum(), inputs)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got_out = GatheredAttention.apply(q, k, None if shared else v, d_v, picked, blind, scale)
        got = [got_out, *torch.autograd.grad((got_out * weight.float()).sum(), inputs)]
    finally:
        torch.set_num_threads(before)
    assert got_out[:, :, 3].abs().max() == 0
    want[0][:, :, 3] = 0.0
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e.double(), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "k_shape",
    [(0, 10, 16), (1, 10, 12)],  # no key heads (a division by zero, once); keys narrower than q (read past)
)
def test_native_gathered_attention_refuses_keys_that_do_not_fit_q(k_shape):
    """Keys whose heads or width do not fit q's get the kernel's error, not a crash or a read past k."""
    from nanoseek.kernels.dsa import native_ops

    ops = native_ops(torch.zeros(1))
    if ops is None:
        pytest.skip("the C++ kernel did not build")
    q, k = torch.randn(1, 4, 2, 16), torch.randn(*k_shape)
    picked, valid = torch.zeros(2, 3, dtype=torch.int32), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="shapes disagree"):
        ops.gathered_attention(q, k, None, 8, picked, valid, 0.3, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_gathered_attention_reads_strided_queries_and_output_gradients_in_place(dtype):
    """The kernel reads q (B, H, T, X) and the output's gradient through their strides (no transposed
    copy): queries that are a slice of a longer sequence, or stored (B, T, H, X), and a gradient
    that is a slice of a wider one, give what their contiguous copies give, bit for bit; the output
    and dq of (B, T, H, X) queries come back stored that way."""
    from nanoseek.kernels.dsa import GatheredAttention, native_ops
    from nanoseek.kernels.native import bf16_kernels

    if native_ops(torch.zeros(1)) is None or dtype == torch.bfloat16 and not bf16_kernels():
        pytest.skip("the C++ kernel takes this dtype only where built for it")
    gen = torch.Generator().manual_seed(11)
    b, h, g, s, x, t, n_picks = 2, 4, 2, 90, 40, 9, 30
    k = torch.randn(b, g, s, x, generator=gen).to(dtype)
    picked = torch.stack([torch.randperm(s, generator=gen)[:n_picks] for _ in range(b * t)]).view(b, t, n_picks)
    valid = torch.rand(b, t, n_picks, generator=gen) > 0.2
    longer = torch.randn(b, h, t + 5, x, generator=gen).to(dtype)[:, :, 3 : 3 + t]  # a slice over T
    stored_bthx = torch.randn(b, t, h, x, generator=gen).to(dtype).transpose(1, 2)  # heads inside a query
    wider_grad = torch.randn(b, h, t + 4, x, generator=gen).to(dtype)[:, :, 2 : 2 + t]
    for q_view in (longer, stored_bthx):
        want = q_view.contiguous().requires_grad_()
        got = q_view.detach().as_strided(q_view.shape, q_view.stride(), q_view.storage_offset()).requires_grad_()
        assert not got.is_contiguous()
        outs = [GatheredAttention.apply(q, k, None, x, picked, valid, 0.3) for q in (got, want)]
        assert torch.equal(outs[0], outs[1])
        outs[0].backward(wider_grad)
        outs[1].backward(wider_grad.contiguous())
        assert torch.equal(got.grad, want.grad)
        if q_view is stored_bthx:  # the output and dq stored as q is: no copy for a (B, T, H, .) consumer
            assert outs[0].transpose(1, 2).is_contiguous() and got.grad.stride() == q_view.stride()


@pytest.mark.parametrize(
    "b,h,g,s,x,d_v,shared,t,n_picks,crowded",
    [
        (2, 4, 2, 40, 24, 16, True, 7, 20, False),  # widths shorter than a 32-column step: masked tails
        (2, 6, 2, 50, 40, 20, False, 7, 25, False),  # separate values, 3 heads a key head (a lone head pair)
        (2, 6, 2, 50, 40, 20, True, 7, 25, False),  # shared values, 3 heads: q's last head pairs with dO's first
        (2, 2, 1, 1280, 576, 64, True, 70, 320, False),  # segments, blocks, DSA's 576-wide keys
        (1, 8, 1, 8000, 64, 48, True, 70, 320, True),  # CSA's crowded picks, 4 head pairs, 2 targets left over
    ],
)
def test_native_gathered_attention_in_bf16_equals_the_reference(b, h, g, s, x, d_v, shared, t, n_picks, crowded):
    """The kernel's bf16 loops (built for AVX-512 BF16) against the float64 reference on the same
    bf16 inputs: within the rounding to bf16 of the weights of its sums (P for the output and dv, dS
    for dq and dk), as a bf16 matrix product rounds them."""
    from nanoseek.kernels.dsa import GatheredAttention, native_forward, native_ops
    from nanoseek.kernels.native import bf16_kernels
    from nanoseek.model.attention.dsa import gathered_attention

    if not bf16_kernels():
        pytest.skip("the kernel takes bf16 only where the CPU has AVX-512 BF16")
    gen = torch.Generator().manual_seed(7)
    scale = 0.3 if x <= 64 else x**-0.5
    q, k, v = (
        torch.randn(b, n, m, w, generator=gen).bfloat16().requires_grad_()
        for n, m, w in ((h, t, x), (g, s, x), (g, s, d_v))
    )
    picked = torch.stack([torch.randperm(s, generator=gen)[:n_picks] for _ in range(b * t)]).view(b, t, n_picks)
    if crowded:
        last = torch.stack([torch.randperm(1000, generator=gen)[: n_picks - 8] for _ in range(b * t)])
        picked = torch.cat([torch.randint(0, 64, (b, t, 8), generator=gen), s - 1000 + last.view(b, t, -1)], dim=-1)
    valid = torch.rand(b, t, n_picks, generator=gen) > 0.3
    valid[..., 0] = True
    weight = torch.randn(b, h, t, d_v, generator=gen, dtype=torch.float64)
    inputs = (q, k) if shared else (q, k, v)
    exact = [a.detach().double().requires_grad_() for a in inputs]  # the same values, float64 leaves
    want_out = gathered_attention(exact[0], exact[1], exact[1][..., :d_v] if shared else exact[2], picked, valid, scale)
    want = [want_out, *torch.autograd.grad((want_out * weight).sum(), exact)]
    got_out = GatheredAttention.apply(q, k, None if shared else v, d_v, picked, valid, scale)
    assert got_out.dtype == torch.bfloat16
    got = [got_out, *torch.autograd.grad((got_out.float() * weight.float()).sum(), inputs)]
    assert all(a.dtype == torch.bfloat16 for a in got)
    values = None if shared else v.detach()
    raw, _ = native_forward(native_ops(q), q.detach(), k.detach(), values, d_v, picked.int(), valid, scale)
    # the weights of p v rounded to bf16 (2^-9 relative each): at most 2^-9 max|v| from the exact output
    bound = 2**-9 * (k[..., :d_v] if shared else v).abs().max().item()
    torch.testing.assert_close(raw.double(), want[0], atol=bound, rtol=0)
    torch.testing.assert_close(got_out.double(), want[0], atol=bound, rtol=2**-8)  # then rounded to bf16 once
    for a, e in zip(got[1:], want[1:]):  # dS and P rounded to bf16 in the gradients' sums, the result too
        torch.testing.assert_close(a.double(), e, atol=6e-3 * e.abs().max().item(), rtol=2**-7)


def test_native_gathered_attention_in_bf16_keeps_an_infinite_value_infinite():
    """An odd number of picks pairs the last picked row with zeros, not with itself at weight 0 (0 * inf
    is NaN): a value of inf in a picked row gives inf, as the reference's."""
    from nanoseek.kernels.dsa import GatheredAttention
    from nanoseek.kernels.native import bf16_kernels
    from nanoseek.model.attention.dsa import gathered_attention

    if not bf16_kernels():
        pytest.skip("the kernel takes bf16 only where the CPU has AVX-512 BF16")
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, 1, w, generator=gen).bfloat16() for w in (64, 64, 64))
    k, v = k.expand(1, 1, 6, 64).contiguous(), torch.randn(1, 1, 6, 64, generator=gen).bfloat16()
    v[0, 0, 4, 3] = float("inf")
    picked, valid = torch.tensor([[[0, 1, 4]]]), torch.ones(1, 1, 3, dtype=torch.bool)
    got = GatheredAttention.apply(q, k, v, 64, picked, valid, 0.5)
    want = gathered_attention(q.double(), k.double(), v.double(), picked, valid, 0.5)
    assert got[0, 0, 0, 3] == float("inf") and not got.isnan().any()
    torch.testing.assert_close(got.double(), want, atol=2**-8 * 4, rtol=2**-7)


def softmax_with_sinks(q, k, v, picked, valid, scale: float, sinks):
    """float64 reference: each query head over its valid picks and one more logit, its sink s_h, whose
    value is zero. q (B, H, T, X), k (B, G, S, X), v (B, G, S, V), picked/valid (B, T, K), sinks (H,)."""
    b, h, t, _ = q.shape
    g = k.shape[1]
    rows = torch.arange(b)[:, None, None, None], torch.arange(g)[None, :, None, None]
    k_sel, v_sel = (x[rows[0], rows[1], picked[:, None]] for x in (k, v))  # (B, G, T, K, .)
    k_sel, v_sel = (x.repeat_interleave(h // g, dim=1) for x in (k_sel, v_sel))  # (B, H, T, K, .)
    logits = torch.einsum("bhtx,bhtkx->bhtk", q, k_sel) * scale
    logits = logits.masked_fill(~valid[:, None], float("-inf"))
    with_sink = torch.cat([logits, sinks.view(1, h, 1, 1).expand(b, h, t, 1)], dim=-1).softmax(-1)
    return torch.einsum("bhtk,bhtkv->bhtv", with_sink[..., :-1], v_sel)


@pytest.mark.parametrize("path", ["native", "native-2-threads", "native-bf16", "pytorch"])
def test_gathered_attention_with_sinks_equals_the_reference(monkeypatch, path):
    """V4's sinks in the gathered attention (one logit per query head with a zero value; the C++
    kernel starts each row's softmax from it): output and the gradients of q, k and the sinks against
    a float64 softmax over the picks and the sink; rows without a valid pick give 0 (all weight on
    the sink) and a sink gradient."""
    from nanoseek.kernels import dsa
    from nanoseek.kernels.native import bf16_kernels

    if path == "native-bf16" and not bf16_kernels():
        pytest.skip("the kernel takes bf16 only where the CPU has AVX-512 BF16")
    assert dsa.native_ops(torch.zeros(1)) is not None, "the C++ kernel did not build (see the warning)"
    if path == "pytorch":
        monkeypatch.setattr(dsa, "native_ops", lambda q: None)
    dtype = {"native-bf16": torch.bfloat16, "pytorch": torch.float64}.get(path, torch.float32)
    gen = torch.Generator().manual_seed(11)
    b, h, g, t, s, x, d_v, n_picks = 2, 6, 2, 70, 90, 40, 32, 20
    q = torch.randn(b, h, t, x, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(b, g, s, x, generator=gen).to(dtype).requires_grad_()
    sinks = torch.randn(h, generator=gen).to(torch.promote_types(dtype, torch.float32)).requires_grad_()
    picked = torch.stack([torch.randperm(s, generator=gen)[:n_picks] for _ in range(b * t)]).view(b, t, n_picks)
    valid = torch.rand(b, t, n_picks, generator=gen) > 0.3
    valid[:, 5] = False  # a query that sees only its sink
    weight = torch.randn(b, h, t, d_v, generator=gen, dtype=torch.float64)
    exact = [a.detach().double().requires_grad_() for a in (q, k, sinks)]
    want_out = softmax_with_sinks(exact[0], exact[1], exact[1][..., :d_v], picked, valid, 0.3, exact[2])
    want = [want_out, *torch.autograd.grad((want_out * weight).sum(), exact)]
    before = torch.get_num_threads()
    torch.set_num_threads(2 if path == "native-2-threads" else 1)
    try:
        out = dsa.GatheredAttention.apply(q, k, None, d_v, picked, valid, 0.3, sinks)
        got = [out, *torch.autograd.grad((out.double() * weight).sum(), (q, k, sinks))]
    finally:
        torch.set_num_threads(before)
    assert out[:, :, 5].abs().max() == 0 and got[3].abs().min() > 0
    for a, e in zip(got, want):
        if dtype == torch.bfloat16:  # P and dS rounded to bf16 in the kernel's sums (see the bf16 test above)
            torch.testing.assert_close(a.double(), e, atol=6e-3 * e.abs().max().item(), rtol=2**-7)
        else:
            tol = 1e-12 if dtype == torch.float64 else 2e-5
            torch.testing.assert_close(a.double(), e, atol=tol, rtol=tol)


@pytest.mark.parametrize("path", ["native", "pytorch"])
def test_gathered_attention_with_sinks_of_minus_infinity_is_without_sinks(monkeypatch, path):
    """A sink logit of -inf weighs nothing: the output and the gradients of q and k are those without
    sinks, and the sinks' gradient is 0 (not NaN), rows without a valid pick included (native)."""
    from nanoseek.kernels import dsa

    if path == "pytorch":
        monkeypatch.setattr(dsa, "native_ops", lambda q: None)
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 9, 16, generator=gen, requires_grad=True)
    k = torch.randn(1, 2, 30, 16, generator=gen, requires_grad=True)
    picked = torch.randint(0, 30, (1, 9, 6), generator=gen)
    valid = torch.ones(1, 9, 6, dtype=torch.bool)
    if path == "native":
        valid[0, 2] = False  # the kernel gives such a row 0 (the PyTorch path's softmax over nothing is NaN)
    sinks = torch.full((4,), float("-inf"), requires_grad=True)
    results = []
    for extra in ((), (sinks,)):
        out = dsa.GatheredAttention.apply(q, k, None, 8, picked, valid, 0.3, *extra)
        results.append([out, *torch.autograd.grad(out.square().sum(), (q, k, *extra))])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert torch.equal(results[1][3], torch.zeros(4))


def test_native_gathered_attention_refuses_a_pick_outside_the_keys():
    from nanoseek.kernels.dsa import GatheredAttention

    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 5, 8)
    picked = torch.tensor([[[0, 1], [0, 5], [1, 2]]])
    with pytest.raises(RuntimeError, match="pick 5 outside 5 keys"):
        GatheredAttention.apply(q, k, None, 8, picked, torch.ones(1, 3, 2, dtype=torch.bool), 0.5)


def test_native_kernels_can_be_turned_off(monkeypatch):
    from nanoseek.kernels import native

    monkeypatch.setenv("NANOSEEK_NATIVE_KERNELS", "0")
    native.load.cache_clear()
    try:
        assert native.load("gathered_attention") is None
    finally:
        monkeypatch.delenv("NANOSEEK_NATIVE_KERNELS")
        native.load.cache_clear()
    assert native.load("gathered_attention") is not None


def test_gathered_attention_under_bf16_autocast_equals_the_reference():
    from nanoseek.kernels.dsa import GatheredAttention
    from nanoseek.model.attention.dsa import gathered_attention

    _, _, q, k, v = dsa_inputs(8, 2, 2, 0, 20, 8)
    g = torch.Generator().manual_seed(3)
    picked = torch.randint(0, 20, (2, 20, 8), generator=g)
    picked[..., 0] = 0  # every query keeps at least one causal key
    valid = picked <= torch.arange(20)[:, None]
    results = []
    for fn in (gathered_attention, lambda q, k, v, p, m, s: GatheredAttention.apply(q, k, v, 8, p, m, s)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(q, k, v, picked, valid, 0.3)
        assert out.dtype == torch.bfloat16  # autocast's dtype out (the C++ kernel computes in fp32)
        results.append([out.float(), *torch.autograd.grad(out.float().square().sum(), (q, k, v))])
    assert [r.dtype for r in results[1][1:]] == [torch.float32] * 3
    for got, want in zip(results[1], results[0]):  # bf16 rounding, at different points in each
        torch.testing.assert_close(got, want, atol=2e-2 * want.abs().max().item(), rtol=5e-2)


def test_dsa_model_long_prefill_with_kernels_equals_the_reference_model(monkeypatch):
    """300 tokens > SELECT_CHUNK through the model: the fast path (gathering) against the reference's."""
    from nanoseek.kernels import dsa as fast

    monkeypatch.setattr(fast, "GATHER_FROM", 1)
    ref, model = twin_models("deepseek-v32-tiny", index_topk=16, index_n_heads=16, max_position_embeddings=512)
    assert isinstance(model.layers[0].self_attn, fast.SparseLatentAttention)
    ids = torch.randint(0, 100, (2, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = model.eval()(ids).logits, ref.eval()(ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_dsa_sparse_training_with_kernels_under_bf16_is_as_accurate_as_the_reference():
    """Under bf16 autocast the training fast path (the gathered kernel computes in fp32) against the
    reference's own bf16 step, both measured against the fp32 reference: loss, indexer loss and the
    gradients no further from fp32 than the reference's."""
    from nanoseek.kernels import dsa as fast

    ref, model = twin_models("deepseek-v32-tiny", index_topk=16, index_n_heads=16, max_position_embeddings=1024)
    exact, _ = twin_models("deepseek-v32-tiny", index_topk=16, index_n_heads=16, max_position_embeddings=1024)
    ids = torch.randint(0, 100, (2, 301), generator=torch.Generator().manual_seed(2))
    sharp = ("q_b_proj.weight", "kv_b_proj.weight", "indexer.wq_b.weight", "indexer.wk.weight")
    calls = []
    original = fast.GatheredAttention.apply
    results = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fast.GatheredAttention, "apply", lambda *a: calls.append(1) or original(*a))
        for m, dtype in ((exact, torch.float32), (ref, torch.bfloat16), (model, torch.bfloat16)):
            with torch.no_grad():
                for name, p in m.named_parameters():
                    if name.endswith(sharp):
                        p.mul_(16)
            m.set_dsa_warmup(False)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                out = m(ids[:, :-1], targets=ids[:, 1:])
            (out.loss + out.aux["index_loss"]).backward()
            grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
            results.append((out.loss.item(), out.aux["index_loss"].item(), grads))
    assert calls  # the bf16 step went through the gathered kernel
    (loss32, index32, g32), *bf16 = results

    def median_grad_error(grads):
        errors = sorted(((grads[n] - g).abs().max() / g.abs().max()).item() for n, g in g32.items())
        return errors[len(errors) // 2]

    (loss_ref, index_ref, g_ref), (loss, index, g) = bf16
    assert abs(loss - loss32) <= 1.5 * abs(loss_ref - loss32) + 1e-3
    assert abs(index - index32) <= 1.5 * abs(index_ref - index32) + 1e-3
    assert g.keys() == g_ref.keys() == g32.keys()
    assert median_grad_error(g) <= 1.2 * median_grad_error(g_ref)


@pytest.mark.parametrize("topk,t", [(16, 300), (280, 600)])  # (280: the first chunk sees 256 keys, padded picks)
def test_dsa_sparse_training_with_kernels_equals_the_reference_model(topk, t):
    """DSA's sparse training phase through the model: the picks gathered, the indexer's KL over the
    picks (kernels) against the reference's T x T mask and KL; the loss, the indexer's loss and every
    parameter's gradient."""
    from nanoseek.kernels import dsa as fast

    ref, model = twin_models("deepseek-v32-tiny", index_topk=topk, index_n_heads=16, max_position_embeddings=1024)
    assert isinstance(model.layers[0].self_attn, fast.SparseLatentAttention)
    ids = torch.randint(0, 100, (2, t + 1), generator=torch.Generator().manual_seed(2))
    sharp = ("q_b_proj.weight", "kv_b_proj.weight", "indexer.wq_b.weight", "indexer.wk.weight")
    results = []
    for m in (ref, model):
        with torch.no_grad():  # peaked attention and indexer: at init both are near uniform, their KL ~1e-5
            for name, p in m.named_parameters():
                if name.endswith(sharp):
                    p.mul_(16)
        m.set_dsa_warmup(False)
        out = m(ids[:, :-1], targets=ids[:, 1:])
        assert out.aux["index_loss"].requires_grad
        (out.loss + out.aux["index_loss"]).backward()
        grads = {name: p.grad for name, p in m.named_parameters()}
        results.append((out.loss, out.aux["index_loss"], grads))
    (loss_ref, index_ref, grads_ref), (loss, index, grads) = results
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    assert index_ref > 0.05
    torch.testing.assert_close(index, index_ref, atol=0, rtol=1e-4)
    assert grads.keys() == grads_ref.keys()
    assert any("indexer" in name and grads[name] is not None for name in grads)
    for name, grad in grads.items():
        if grads_ref[name] is None:
            assert grad is None, name
        else:
            torch.testing.assert_close(grad, grads_ref[name], atol=2e-5, rtol=1e-3, msg=name)
