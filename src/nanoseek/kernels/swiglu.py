"""SwiGLU's training fast paths: h = SiLU(g) * u,  y = W_down h + b  (model/ffn.py's math).

    FusedSwiGLU (the dense FFN): in training one autograd Function (`SwiGLUMLPFunction`)
    swiglu_down (the routed experts' SiLU(g) * u + down projection, grouped): `SwiGLUDownFunction`
    swiglu (SiLU(g) * u alone): `SwiGLUFunction`

All keep only g and u of the hidden: h = SiLU(g) * u is recomputed in backward (elementwise), so no
I-wide h per token is kept for the down projection's weight gradient, and the dense backwards go
over chunks of rows (`BACKWARD_ROWS`) so no full-size temporaries or [dg, du] gradient are held at
once. V4's clamp (`limit`) runs the plain ops under autograd.

    >>> ffn = FusedSwiGLU(8, 16)
    >>> ffn(torch.randn(3, 8, requires_grad=True)).grad_fn.name()
    'SwiGLUMLPFunctionBackward'
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoseek.kernels.grouped_gemm import grouped_mm
from nanoseek.model.ffn import SwiGLU
from nanoseek.model.ffn import swiglu as reference_swiglu


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """SiLU(gate) * up (model/ffn.py's `swiglu`), through `SwiGLUFunction` when autograd records
    and there is no clamp."""
    if limit is None and torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SwiGLUFunction.apply(gate, up)
    return reference_swiglu(gate, up, limit)


class SwiGLUFunction(torch.autograd.Function):
    """SiLU(g) * u that keeps only g and u for backward (views of the one gate_up output) and
    recomputes SiLU there, instead of also keeping SiLU(g) (one I-wide activation per token less):
        d/dg = grad * u * s * (1 + g (1 - s)),  d/du = grad * g s,   s = sigmoid(g)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
        swiglu_input_grads(grad, gate, up, torch.sigmoid(gate), d_gate, d_up)
        return d_gate, d_up


def swiglu_input_grads(dh, gate, up, sig, d_gate, d_up) -> None:
    """Write d/dg = dh * u * s * (1 + g (1 - s)) and d/du = dh * g * s into d_gate, d_up
    (s = sigmoid(g), passed in as `sig` and overwritten)."""
    if torch.compiler.is_compiling():  # dynamo traces no out= into a strided view; inductor fuses these
        d_up.copy_(dh * gate * sig)
        d_gate.copy_(dh * up * sig * (1 + gate * (1 - sig)))
        return
    torch.mul(dh, gate, out=d_up).mul_(sig)
    torch.mul(dh, up, out=d_gate).mul_(sig)
    d_gate.mul_(sig.neg_().add_(1).mul_(gate).add_(1))


def swiglu_down(
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
    limit: float | None = None,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """W_down (s * SiLU(gate) * up) + b from the fused [gate, up] projection (..., 2I): a dense down
    projection (weight (D, I)), or with `offsets` the grouped one of the routed experts (weight
    (E, D, I), rows of expert e end at offsets[e]); `row_scale` s (M,) weights each row (the router's
    weight of each token copy; 2-D `gate_up` only), default 1."""
    tensors = (gate_up, weight, bias, row_scale)
    recording = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if recording and limit is None and gate_up.shape[0] > 0:
        return SwiGLUDownFunction.apply(gate_up, weight, bias, offsets, row_scale)
    if recording:  # V4's clamp, under autograd
        h = swiglu(*gate_up.chunk(2, dim=-1), limit)
        h = h if row_scale is None else h * row_scale[:, None].to(h.dtype)
    else:  # inference: one new (M, I) tensor, the rest in place
        gate, up = gate_up.chunk(2, dim=-1)
        if limit is not None:
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        h = F.silu(gate).mul_(up)
        if row_scale is not None:
            h.mul_(row_scale[:, None].to(h.dtype))
    if offsets is None:
        return F.linear(h, weight, bias)
    return grouped_mm(h, weight.transpose(1, 2), offsets)


class SwiGLUDownFunction(torch.autograd.Function):
    """y = W_down (s h) + b, h = SiLU(g) * u, [g, u] = the gate_up projection, keeping [g, u] and
    the row scales s, not h.

    Backward recomputes sig = sigmoid(g) and h, then with dh' = dy W:
        dW = dy^T (s h) (per expert when grouped),   db = sum dy,   ds = rowsum(dh' * h),
        dh = s dh',   dg = dh * u * sig * (1 + g (1 - sig)),   du = dh * g sig,
    in place where it can and written straight into one [dg, du] gradient: the early backward of
    a layer is where training peaks in memory."""

    @staticmethod
    def forward(ctx, gate_up, weight, bias, offsets, row_scale):
        gate, up = gate_up.chunk(2, dim=-1)
        h = F.silu(gate) * up
        if row_scale is not None:
            h = h * row_scale[:, None].to(h.dtype)
        if offsets is None:
            y = F.linear(h, weight, bias)
        else:
            y = grouped_mm(h, weight.transpose(1, 2), offsets)
        ctx.save_for_backward(gate_up, weight, offsets, row_scale)
        return y

    @staticmethod
    def backward(ctx, dy):
        gate_up, weight, offsets, row_scale = ctx.saved_tensors
        need_w, need_s = ctx.needs_input_grad[1], row_scale is not None and ctx.needs_input_grad[4]
        if offsets is None:
            d_gate_up, dw, ds = swiglu_down_dense_grads(gate_up, weight, row_scale, dy, need_w, need_s)
        else:
            d_gate_up, dw, ds = swiglu_down_grouped_grads(gate_up, weight, offsets, row_scale, dy, need_w, need_s)
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None  # False without a bias
        return d_gate_up, dw, db, None, ds


BACKWARD_ROWS = 256  # rows per step of the dense SwiGLU backwards (bounds their (rows, I) temporaries)


def swiglu_hidden(gate_up, dh, scale, need_s: bool):
    """The backward's view of rows [g, u] (R, 2I) given dh' = dy W_down (R, I):
    (g, u, sig = sigmoid(g), s h for the down weight's gradient, ds (R,) or None), with dh' scaled
    by s in place (`scale` s (R,) or None). sig and h are new (R, I) tensors; the caller drops h
    once the weight gradient has it, then writes [dg, du] with `swiglu_input_grads`."""
    gate, up = gate_up.chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    h = torch.mul(gate, sig).mul_(up)
    ds = None
    if scale is not None:
        if need_s:
            ds = row_dots(dh, h).to(scale.dtype)
        h.mul_(scale[:, None].to(h.dtype))
        dh.mul_(scale[:, None].to(h.dtype))
    return gate, up, sig, h, ds


def row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(R,) sum_i a[r, i] b[r, i]: as R one-row matmuls without an (R, I) temporary, except for
    bf16/fp16 on the CPU, where those are R oneDNN calls (~2.8 ms at R = 1,536, 256 wide; ~0.2 ms
    for the product and sum): there the products in fp32 (exact), summed in fp32."""
    if a.device.type == "cpu" and a.dtype in (torch.bfloat16, torch.float16):
        return (a.float() * b.float()).sum(-1)
    return torch.bmm(a.unsqueeze(-2), b.unsqueeze(-1)).flatten()


def row_chunks(m: int):
    for a in range(0, m, BACKWARD_ROWS):
        yield a, min(a + BACKWARD_ROWS, m)


def accumulate_mm(acc, a, b):
    """acc + a @ b over the row chunks of a weight gradient, summed in fp32 or wider (a bf16 total
    of many chunks would round at every chunk; one matmul rounds once)."""
    if a.dtype in (torch.float32, torch.float64):
        return torch.matmul(a, b) if acc is None else acc.addmm_(a, b)
    part = torch.matmul(a, b).float()
    return part if acc is None else acc.add_(part)


def accumulate_sum(acc, rows):
    """acc + the column sums of rows, in fp32 or wider (a bias gradient over row chunks)."""
    part = rows.sum(0, dtype=torch.promote_types(rows.dtype, torch.float32))
    return part if acc is None else acc.add_(part)


def finished_grad(total, like: torch.Tensor, needed: bool):
    """A chunk-accumulated gradient in the dtype of `like`; zeros when no row contributed (M = 0)."""
    if not needed:
        return None
    return torch.zeros_like(like) if total is None else total.to(like.dtype)


def swiglu_down_dense_grads(gate_up, weight, row_scale, dy, need_w: bool, need_s: bool):
    """SwiGLUDownFunction's backward for a dense down projection, over chunks of BACKWARD_ROWS rows
    straight into the one (M, 2I) gradient: no full-size sig, h or dh' is ever held."""
    gu = gate_up.reshape(-1, gate_up.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    w = weight.to(dy.dtype)
    d_gu = torch.empty_like(gu)
    dw = None
    ds = torch.empty(gu.shape[0], dtype=row_scale.dtype, device=gu.device) if need_s else None
    for a, z in row_chunks(gu.shape[0]):
        scale = None if row_scale is None else row_scale[a:z]
        dh = torch.matmul(dy2[a:z], w)
        gate, up, sig, h, ds_c = swiglu_hidden(gu[a:z], dh, scale, need_s)
        if need_s:
            ds[a:z] = ds_c
        if need_w:
            dw = accumulate_mm(dw, dy2[a:z].T, h)
        del h
        swiglu_input_grads(dh, gate, up, sig, *d_gu[a:z].chunk(2, dim=-1))
    return d_gu.view_as(gate_up), finished_grad(dw, weight, need_w), ds


def swiglu_down_grouped_grads(gate_up, weight, offsets, row_scale, dy, need_w: bool, need_s: bool):
    """SwiGLUDownFunction's backward for the routed experts' grouped down projection (rows sorted by
    expert, expert e's rows end at offsets[e]), whole: h is dropped before the [dg, du] gradient is
    made, so the two are never held together."""
    dh = grouped_mm(dy, weight.to(dy.dtype), offsets)
    gate, up, sig, h, ds = swiglu_hidden(gate_up, dh, row_scale, need_s)
    dw = grouped_mm(dy.T, h, offsets) if need_w else None
    del h
    d_gate_up = torch.empty_like(gate_up)
    swiglu_input_grads(dh, gate, up, sig, *d_gate_up.chunk(2, dim=-1))
    return d_gate_up, dw, ds


class SwiGLUMLPFunction(torch.autograd.Function):
    """The whole SwiGLU FFN in training, y = W_down (SiLU(g) * u) + b_down, [g, u] = W_gu x + b_gu,
    keeping x and [g, u] for backward (not h; and x, an RMSNorm output in every model here, is
    itself recomputed when the model's forward runs under `recomputed_norm_outputs` — in fp32; under
    bf16 autocast x is autocast's bf16 copy, kept as the linear would keep it).

    The backward goes over chunks of BACKWARD_ROWS rows: each chunk's [dg, du] (`swiglu_hidden`)
    goes at once through the gate_up projection's backward,
        dx = [dg, du] W_gu,   dW_gu += [dg, du]^T x,   db_gu += sum [dg, du],
    so no (M, 2I) gradient is ever held: on llama-small's training step that gradient was the
    step's heap peak (the last layer's FFN backward)."""

    @staticmethod
    def forward(ctx, x, w_gate_up, b_gate_up, w_down, b_down):
        gate_up = F.linear(x, w_gate_up, b_gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w_down, b_down)
        ctx.save_for_backward(x, w_gate_up, gate_up, w_down)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_gate_up, gate_up, w_down = ctx.saved_tensors
        need_x, need_wgu, need_bgu, need_wd, need_bd = ctx.needs_input_grad
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        gu = gate_up.reshape(-1, gate_up.shape[-1])
        dx = torch.empty_like(x2) if need_x else None
        d_gu = gu.new_empty(min(BACKWARD_ROWS, gu.shape[0]), gu.shape[1])  # one chunk's [dg, du], reused
        w_d, w_gu = w_down.to(dy.dtype), w_gate_up.to(dy.dtype)
        dw_gu = db_gu = dw_d = None
        for a, z in row_chunks(gu.shape[0]):
            d_gu_c = d_gu[: z - a]
            dh = torch.matmul(dy2[a:z], w_d)
            gate, up, sig, h, _ = swiglu_hidden(gu[a:z], dh, None, False)
            if need_wd:
                dw_d = accumulate_mm(dw_d, dy2[a:z].T, h)
            del h
            swiglu_input_grads(dh, gate, up, sig, *d_gu_c.chunk(2, dim=-1))
            if need_x:
                torch.matmul(d_gu_c, w_gu, out=dx[a:z])
            if need_wgu:
                dw_gu = accumulate_mm(dw_gu, d_gu_c.T, x2[a:z].to(d_gu_c.dtype))
            if need_bgu:  # needs_input_grad is False for an absent bias
                db_gu = accumulate_sum(db_gu, d_gu_c)
        return (
            None if dx is None else dx.view_as(x),
            finished_grad(dw_gu, w_gate_up, need_wgu),
            finished_grad(db_gu, w_gate_up[:, 0], need_bgu),
            finished_grad(dw_d, w_down, need_wd),
            dy2.sum(0) if need_bd else None,
        )


class FusedSwiGLU(SwiGLU):
    """SwiGLU (same linears, same values) whose training forward is one `SwiGLUMLPFunction`, which
    calls the two projections' weights directly (hooks on `gate_up_proj` / `down_proj` do not run
    there); otherwise the gate_up linear and `swiglu_down` (in place at inference)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = self.gate_up_proj, self.down_proj
        if self.limit is None and torch.is_grad_enabled() and (x.requires_grad or up.weight.requires_grad):
            params = (up.weight, up.bias, down.weight, down.bias)
            kind = x.device.type
            if torch.is_autocast_enabled(kind):  # as autocast would cast each linear's inputs
                dtype = torch.get_autocast_dtype(kind)
                x, params = x.to(dtype), tuple(None if p is None else p.to(dtype) for p in params)
            return SwiGLUMLPFunction.apply(x, *params)
        gate_up = up(x)
        return swiglu_down(
            gate_up,
            down.weight.to(gate_up.dtype),
            None if down.bias is None else down.bias.to(gate_up.dtype),
            limit=self.limit,
        )
