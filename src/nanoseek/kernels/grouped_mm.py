"""The routed experts' fast path: one grouped matmul for all experts (model/moe/experts.py's math).

    y_m = W2_e (s_m SiLU(W1_e x_m) * W3_e x_m)   for the rows m of each expert e, sorted by expert

`GroupedExperts` runs the gate/up projection as one `torch._grouped_mm` over all experts (offsets
= the running count of each expert's rows), gathering the token copies inside it
(`GatheredGroupedMM`: the (N k, D) copies are not kept for backward), then SiLU(g) * u and the down
projection as kernels/swiglu.py's grouped `swiglu_down` (h recomputed in backward). Where torch's
grouped matmul cannot run (old torch, other devices or dtypes, unaligned widths) it falls back to
one matmul per expert. Under torch.compile in fp32 the grouped products go through the opaque
`nanoseek::grouped_mm` ops (their own fake-tensor rules), so the experts stay in one graph.

    >>> experts = GroupedExperts(4, 8, 16)
    >>> _ = torch.nn.init.normal_(experts.gate_up_proj), torch.nn.init.normal_(experts.down_proj)
    >>> experts(torch.randn(5, 8), torch.tensor([2, 0, 3, 0])).shape
    torch.Size([5, 8])
"""

from __future__ import annotations

import torch

from nanoseek.kernels.grouped_gemm import grouped_mm
from nanoseek.kernels.swiglu import swiglu, swiglu_down
from nanoseek.model.moe.experts import RoutedExperts, matmul_dtype


class GroupedExperts(RoutedExperts):
    """RoutedExperts (same weights, same values) applied with grouped matmuls."""

    def forward(
        self,
        x: torch.Tensor,
        counts_E: torch.Tensor,
        w_M: torch.Tensor | None = None,
        rows_M: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Expert outputs (M, D) for the M token copies sorted by expert. x: the copies (M, D), or
        with `rows_M` the tokens (N, D) and the token of each copy (the copies x[rows_M] are then
        gathered inside the first grouped matmul and not kept for backward); counts_E: how many
        copies each expert owns; w_M: the router's weight of each copy, applied to the expert's
        hidden (None: unweighted)."""
        dtype = matmul_dtype(x)
        x = x.to(dtype)
        aligned = all(n * x.element_size() % 16 == 0 for n in x.shape[1:] + (self.hidden,))  # grouped_mm's strides
        fused = self.limit is None and aligned and has_grouped_mm(x) and (rows_M is None or len(rows_M) > 0)
        if fused:  # two Functions that keep neither the gathered copies nor the hidden h for backward
            offsets = counts_E.cumsum(0).to(torch.int32)
            if rows_M is None:
                h_MX = grouped_matmul(x, self.gate_up_proj.to(dtype), counts_E)
            else:
                h_MX = GatheredGroupedMM.apply(x, rows_M, self.gate_up_proj.to(dtype), offsets)
            return swiglu_down(h_MX, self.down_proj.to(dtype), offsets=offsets, row_scale=w_M)
        x_MD = x if rows_M is None else x.index_select(0, rows_M)
        h_MX = grouped_matmul(x_MD, self.gate_up_proj.to(dtype), counts_E)
        gate_MI, up_MI = h_MX.split(self.hidden, dim=-1)
        y_MD = grouped_matmul(swiglu(gate_MI, up_MI, self.limit), self.down_proj.to(dtype), counts_E)
        return y_MD if w_M is None else y_MD * w_M[:, None].to(dtype)


GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class GatheredGroupedMM(torch.autograd.Function):
    """y = x[rows] W_e^T for the rows of each expert e (offsets as torch._grouped_mm's), keeping x
    and the row ids for backward instead of the gathered copies (k per token):
        dW_e = dy_e^T x[rows]_e (re-gathered),   dx = index_add over rows of dy W_e."""

    @staticmethod
    def forward(ctx, x_ND, rows_M, w_EOK, offsets):
        ctx.save_for_backward(x_ND, rows_M, w_EOK, offsets)
        return grouped_mm(x_ND.index_select(0, rows_M), w_EOK.transpose(1, 2), offsets)

    @staticmethod
    def backward(ctx, dy):
        x_ND, rows_M, w_EOK, offsets = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[2]:
            dw = grouped_mm(dy.T, x_ND.index_select(0, rows_M).to(dy.dtype), offsets)
        if ctx.needs_input_grad[0]:
            dx_MK = grouped_mm(dy, w_EOK.to(dy.dtype), offsets)
            dx = torch.zeros_like(x_ND).index_add_(0, rows_M, dx_MK.to(x_ND.dtype))
        return dx, None, dw, None


def has_grouped_mm(x: torch.Tensor) -> bool:
    """torch._grouped_mm can run here, called directly: fp32/bf16/fp16 rows on CPU or CUDA (and under
    torch.compile, whose fake-tensor rule accepts only bf16, bf16 only; `grouped_matmul` then goes
    through the opaque `nanoseek::grouped_mm` op instead)."""
    return (
        hasattr(torch, "_grouped_mm")
        and x.device.type in ("cpu", "cuda")
        and x.shape[0] > 0
        and x.dtype in GROUPED_MM_DTYPES
        and not (torch.compiler.is_compiling() and x.dtype != torch.bfloat16)
    )


def grouped_matmul(x_MK: torch.Tensor, w_EOK: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Rows of x owned by expert e times w[e]^T, for all experts at once."""
    if x_MK.shape[0] == 0:  # an empty product, not fresh zeros: keeps x and w in the autograd graph
        return x_MK @ w_EOK[0].T
    offsets = counts_E.cumsum(0).to(torch.int32)
    if has_grouped_mm(x_MK):
        try:
            return grouped_mm(x_MK, w_EOK.transpose(1, 2), offsets)
        except (RuntimeError, NotImplementedError):
            pass
    elif torch.compiler.is_compiling() and opaque_grouped_mm_fits(x_MK, w_EOK):
        return opaque_grouped_mm(x_MK, w_EOK.transpose(1, 2), offsets)  # one graph in fp32 too
    pieces = x_MK.split(counts_E.tolist())
    return torch.cat([p @ w_EOK[e].T for e, p in enumerate(pieces)])


def opaque_grouped_mm_fits(x_MK: torch.Tensor, w_EOK: torch.Tensor) -> bool:
    """`opaque_grouped_mm` takes these: fp32/bf16 on CPU or CUDA, rows and outputs 16-byte aligned
    (torch's kernels need it, and its CUDA output pads unaligned rows, which the fake rule does not)."""
    return (
        hasattr(torch, "_grouped_mm")
        and x_MK.device.type in ("cpu", "cuda")
        and x_MK.dtype in (torch.float32, torch.bfloat16)
        and all(n * x_MK.element_size() % 16 == 0 for n in (x_MK.shape[1], w_EOK.shape[1]))
    )


@torch.library.custom_op("nanoseek::grouped_mm", mutates_args=())
def opaque_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm(x (M, K), w (E, K, N), offs) -> (M, N) as an op torch.compile does not look
    into: its own fake-tensor rule, unlike torch's, takes fp32, so a compiled fp32 MoE step keeps the
    experts in its graph (torch's rule would break it at a host copy of the counts)."""
    return torch._grouped_mm(x.contiguous(), w, offs=offsets)  # x may be a broadcast gradient


@opaque_grouped_mm.register_fake
def _(x, w, offsets):
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("nanoseek::grouped_mm_weight_grad", mutates_args=())
def opaque_grouped_mm_weight_grad(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """dW[e] = x_e^T dy_e over each expert's rows: (E, K, N)."""
    return torch._grouped_mm(x.T, dy.contiguous(), offs=offsets)


@opaque_grouped_mm_weight_grad.register_fake
def _(x, dy, offsets):
    return x.new_empty(offsets.shape[0], x.shape[1], dy.shape[1])


def _grouped_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, dy):
    x, w, offsets = ctx.saved_tensors
    dx = opaque_grouped_mm(dy, w.transpose(1, 2), offsets) if ctx.needs_input_grad[0] else None
    dw = opaque_grouped_mm_weight_grad(x, dy, offsets) if ctx.needs_input_grad[1] else None
    return dx, dw, None


opaque_grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)
