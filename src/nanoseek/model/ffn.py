"""Position-wise feed-forward networks.

    ReLU (Vaswani):  FFN(x) = max(0, x W1 + b1) W2 + b2
    GELU (GPT-2):    FFN(x) = GELU(x W1 + b1) W2 + b2
    SwiGLU (Llama, DeepSeek dense layers):  FFN(x) = W_down (SiLU(W_gate x) * W_up x)
    DeepSeek-V4 clamps the pre-activations at a limit L: SiLU(min(W_gate x, L)) * clamp(W_up x, -L, L)

The SwiGLU gate and up projections are one fused matmul (`gate_up_proj`, gate rows first). In
training, SiLU(g) * u and the down projection are one autograd Function (`SwiGLUDownFunction`)
that keeps only g and u: the hidden h = SiLU(g) * u is recomputed in backward (elementwise), so
no I-wide h per token is kept for the down projection's weight gradient.

    >>> MLP(64, 256, "relu")(torch.randn(2, 3, 64)).shape
    torch.Size([2, 3, 64])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """Two linear layers around a ReLU or GELU."""

    def __init__(self, dim: int, hidden: int, activation: str = "relu", bias: bool = True):
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = F.relu if activation == "relu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """SiLU(gate) * up, with V4's clamp when `limit` is set."""
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    elif torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SwiGLUFunction.apply(gate, up)
    return F.silu(gate) * up


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
    torch.mul(dh, gate, out=d_up).mul_(sig)
    torch.mul(dh, up, out=d_gate).mul_(sig)
    d_gate.mul_(sig.neg_().add_(1).mul_(gate).add_(1))


def swiglu_down(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                offsets: torch.Tensor | None = None, limit: float | None = None,
                row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """W_down (s * SiLU(gate) * up) + b from the fused [gate, up] projection (..., 2I): a dense down
    projection (weight (D, I)), or with `offsets` the grouped one of the routed experts (weight
    (E, D, I), rows of expert e end at offsets[e]); `row_scale` s (M,) weights each row (the router's
    weight of each token copy; 2-D `gate_up` only), default 1."""
    tensors = (gate_up, weight, bias, row_scale)
    recording = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if recording and limit is None and gate_up.shape[0] > 0:
        return SwiGLUDownFunction.apply(gate_up, weight, bias, offsets, row_scale)
    h = swiglu(*gate_up.chunk(2, dim=-1), limit)
    if row_scale is not None:
        h = h * row_scale[:, None].to(h.dtype)
    if offsets is None:
        return F.linear(h, weight, bias)
    return torch._grouped_mm(h, weight.transpose(1, 2), offs=offsets)


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
            y = torch._grouped_mm(h, weight.transpose(1, 2), offs=offsets)
        ctx.save_for_backward(gate_up, weight, offsets, row_scale)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        gate_up, weight, offsets, row_scale = ctx.saved_tensors
        need_w, need_s = ctx.needs_input_grad[1], row_scale is not None and ctx.needs_input_grad[4]
        if offsets is None:
            d_gate_up, dw, ds = swiglu_down_dense_grads(gate_up, weight, row_scale, dy, need_w, need_s)
        else:
            d_gate_up, dw, ds = swiglu_down_grouped_grads(gate_up, weight, offsets, row_scale, dy, need_w, need_s)
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return d_gate_up, dw, db, None, ds


BACKWARD_ROWS = 256  # rows per step of the dense SwiGLU backwards (bounds their (rows, I) temporaries)


def swiglu_rows_grads(gate_up, w_down, dy, scale, need_s: bool, d_gate_up):
    """For rows [g, u] (R, 2I) of a dense SwiGLU-down: write [dg, du] into d_gate_up (R, 2I) and
    return (s h (R, I), for the down weight's gradient; ds (R,) or None). sig, h and dh' are (R, I)
    temporaries."""
    gate, up = gate_up.chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    h = torch.mul(gate, sig).mul_(up)
    dh = torch.matmul(dy, w_down)
    ds = None
    if scale is not None:
        if need_s:  # row-wise dot products without an (R, I) temporary
            ds = torch.bmm(dh.unsqueeze(-2), h.unsqueeze(-1)).flatten()
        h.mul_(scale[:, None].to(h.dtype))
        dh.mul_(scale[:, None].to(h.dtype))
    swiglu_input_grads(dh, gate, up, sig, *d_gate_up.chunk(2, dim=-1))
    return h, ds


def row_chunks(m: int):
    for a in range(0, m, BACKWARD_ROWS):
        yield a, min(a + BACKWARD_ROWS, m)


def accumulate_mm(acc, a, b):
    """acc + a @ b (a fresh product when acc is None)."""
    return torch.matmul(a, b) if acc is None else acc.addmm_(a, b)


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
        h, ds_c = swiglu_rows_grads(gu[a:z], w, dy2[a:z], scale, need_s, d_gu[a:z])
        if need_s:
            ds[a:z] = ds_c
        if need_w:
            dw = accumulate_mm(dw, dy2[a:z].T, h)
    return d_gu.view_as(gate_up), dw, ds


def swiglu_down_grouped_grads(gate_up, weight, offsets, row_scale, dy, need_w: bool, need_s: bool):
    """SwiGLUDownFunction's backward for the routed experts' grouped down projection (rows sorted by
    expert, expert e's rows end at offsets[e]), in place where it can."""
    gate, up = gate_up.chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    h = torch.mul(gate, sig).mul_(up)
    dh = torch._grouped_mm(dy, weight.to(dy.dtype), offs=offsets)
    ds = dw = None
    if row_scale is not None:
        scale = row_scale[:, None].to(h.dtype)
        if need_s:  # row-wise dot products without an (M, I) temporary
            ds = torch.bmm(dh.unsqueeze(-2), h.unsqueeze(-1)).flatten().to(row_scale.dtype)
        h.mul_(scale)
        dh.mul_(scale)
    if need_w:
        dw = torch._grouped_mm(dy.T, h, offs=offsets)
    del h
    d_gate_up = torch.empty_like(gate_up)
    swiglu_input_grads(dh, gate, up, sig, *d_gate_up.chunk(2, dim=-1))
    return d_gate_up, dw, ds


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = False, limit: float | None = None):
        super().__init__()
        self.hidden, self.limit = hidden, limit
        self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = self.gate_up_proj, self.down_proj
        params = (up.weight, up.bias, down.weight, down.bias)
        if self.limit is None and torch.is_grad_enabled() and (x.requires_grad or up.weight.requires_grad):
            kind = x.device.type
            dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
            return SwiGLUMLPFunction.apply(x.to(dtype), *(None if p is None else p.to(dtype) for p in params))
        gate_up = up(x)
        return swiglu_down(gate_up, down.weight.to(gate_up.dtype),
                           None if down.bias is None else down.bias.to(gate_up.dtype), limit=self.limit)


class SwiGLUMLPFunction(torch.autograd.Function):
    """The whole SwiGLU FFN in training, y = W_down (SiLU(g) * u) + b_down, [g, u] = W_gu x + b_gu,
    keeping x and [g, u] for backward (not h; and x, an RMSNorm output in every model here, is
    itself recomputed when the model's forward runs under `recomputed_norm_outputs`).

    The backward goes over chunks of BACKWARD_ROWS rows: each chunk's [dg, du] (`swiglu_rows_grads`)
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
        ctx.biases = (b_gate_up is not None, b_down is not None)
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
            d_gu_c = d_gu[:z - a]
            h, _ = swiglu_rows_grads(gu[a:z], w_d, dy2[a:z], None, False, d_gu_c)
            if need_wd:
                dw_d = accumulate_mm(dw_d, dy2[a:z].T, h)
            del h
            if need_x:
                torch.matmul(d_gu_c, w_gu, out=dx[a:z])
            if need_wgu:
                dw_gu = accumulate_mm(dw_gu, d_gu_c.T, x2[a:z].to(d_gu_c.dtype))
            if need_bgu and ctx.biases[0]:
                db_gu = d_gu_c.sum(0) if db_gu is None else db_gu.add_(d_gu_c.sum(0))
        db_d = dy2.sum(0) if need_bd and ctx.biases[1] else None
        return None if dx is None else dx.view_as(x), dw_gu, db_gu, dw_d, db_d


def make_dense_ffn(kind: str, dim: int, hidden: int, bias: bool) -> nn.Module:
    if kind == "swiglu":
        return SwiGLU(dim, hidden, bias)
    return MLP(dim, hidden, kind, bias)
