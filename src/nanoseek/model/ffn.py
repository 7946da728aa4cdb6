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
        gate, up = gate_up.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        h = torch.mul(gate, sig).mul_(up)
        grouped = offsets is not None
        dh = torch._grouped_mm(dy, weight.to(dy.dtype), offs=offsets) if grouped else torch.matmul(dy, weight.to(dy.dtype))
        ds = db = dw = None
        if row_scale is not None:
            scale = row_scale[:, None].to(h.dtype)
            if ctx.needs_input_grad[4]:  # row-wise dot products without an (M, I) temporary
                ds = torch.bmm(dh.unsqueeze(-2), h.unsqueeze(-1)).flatten().to(row_scale.dtype)
            h.mul_(scale)
            dh.mul_(scale)
        if ctx.needs_input_grad[1]:
            dw = torch._grouped_mm(dy.T, h, offs=offsets) if grouped else torch.matmul(
                dy.reshape(-1, dy.shape[-1]).T, h.reshape(-1, h.shape[-1]))
        del h
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.reshape(-1, dy.shape[-1]).sum(0)
        d_gate_up = torch.empty_like(gate_up)
        swiglu_input_grads(dh, gate, up, sig, *d_gate_up.chunk(2, dim=-1))
        return d_gate_up, dw, db, None, ds


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = False, limit: float | None = None):
        super().__init__()
        self.hidden, self.limit = hidden, limit
        self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        down = self.down_proj
        return swiglu_down(gate_up, down.weight.to(gate_up.dtype),
                           None if down.bias is None else down.bias.to(gate_up.dtype), limit=self.limit)


def make_dense_ffn(kind: str, dim: int, hidden: int, bias: bool) -> nn.Module:
    if kind == "swiglu":
        return SwiGLU(dim, hidden, bias)
    return MLP(dim, hidden, kind, bias)
