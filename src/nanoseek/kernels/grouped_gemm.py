"""Grouped matmuls of the routed experts, with row counts bucketed for the CPU's bf16 GEMMs.

    rows form:         y[rows of e] = x[rows of e] W_e              x (M, K), W (E, K, N) -> (M, N)
    contraction form:  dW_e = a[:, rows of e] b[rows of e]           a (K, M), b (M, N)   -> (E, K, N)

(torch._grouped_mm's two 2-D/3-D forms; `offs` = where each expert's rows end.)

On the CPU, bf16 and fp16 matmuls go through oneDNN, which builds (JIT-compiles) a kernel for each
new shape and caches it by shape. An expert's row count changes every step with the routing, so a
plain loop of per-expert matmuls, or torch._grouped_mm (the same loop inside), pays a kernel build
for almost every product: measured on a Zen 4 (AVX-512-bf16), a (M, 256) x (256, 512) bf16 product
costs 0.21 ms with a repeated M and 0.64 ms with a new M each call. fp32 products (MKL's sgemm)
build nothing and are left to torch._grouped_mm.

`grouped_mm` rounds each expert's row count n up to a bucket (16, then 4 sizes per octave: at most
a quarter more rows, one of a few dozen shapes per width) and multiplies a window of that many rows:
    rows form:         the window [lo, lo + p) around the expert's rows [s, s + n) (rows of the
                       neighbouring experts ride along and their outputs are dropped);
    contraction form:  the same window of b with the rows outside [s, s + n) zeroed, so they add 0.
The rows form gives torch._grouped_mm's values bit for bit (each output row is the same sum in the
same order); the contraction form sums the same products, in an order that can differ in the last
bf16 place where the window starts before the expert's rows (the experts near the end of M).
Under autograd the rows form runs as `BucketedRowsMM` (its gradients are these two forms again).

    >>> x, w = torch.randn(5, 4).bfloat16(), torch.randn(2, 4, 3).bfloat16()
    >>> offs = torch.tensor([2, 5], dtype=torch.int32)
    >>> torch.equal(grouped_mm(x, w, offs), torch.cat([x[:2] @ w[0], x[2:] @ w[1]]))
    True
"""

from __future__ import annotations

import torch

BUCKETED_DTYPES = (torch.bfloat16, torch.float16)
MIN_BUCKET = 16


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm(a, b, offs=offs) for a 2-D `a` and a 3-D (rows form) or 2-D (contraction
    form) `b`, with bucketed row counts for half-precision matmuls on the CPU (there the contraction
    form is for gradients: it takes no inputs that require grad)."""
    if not uses_buckets(a):
        return torch._grouped_mm(a, b, offs=offs)
    ends = offs.tolist()
    starts = [0] + ends[:-1]
    if b.dim() == 3:
        if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
            return BucketedRowsMM.apply(a, b, offs)
        return rows_grouped_mm(a, b, starts, ends)
    return contraction_grouped_mm(a, b, starts, ends)


class BucketedRowsMM(torch.autograd.Function):
    """The rows form under autograd, with the grouped products' own gradients (autograd through the
    per-expert slices would build a gradient of all of x and of all of w per expert):
        dx = grouped_mm(dy, w^T)   (rows form),   dw = grouped_mm(x^T, dy)   (contraction form)"""

    @staticmethod
    def forward(ctx, x, w, offs):
        ctx.save_for_backward(x, w, offs)
        return grouped_mm(x, w, offs)  # autograd is off inside forward: the plain rows form

    @staticmethod
    def backward(ctx, dy):
        x, w, offs = ctx.saved_tensors
        dy = dy.contiguous()
        dx = grouped_mm(dy, w.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
        dw = grouped_mm(x.T, dy, offs) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def uses_buckets(a: torch.Tensor) -> bool:
    """Half-precision products on the CPU, outside torch.compile (whose graphs keep torch's op)."""
    return a.device.type == "cpu" and a.dtype in BUCKETED_DTYPES and not torch.compiler.is_compiling()


def bucket(n: int) -> int:
    """n rounded up to MIN_BUCKET or, from there, to a multiple of an eighth of the next power of
    two above it (4 sizes per octave, at most 1/4 more rows)."""
    if n <= MIN_BUCKET:
        return MIN_BUCKET
    step = 1 << (n.bit_length() - 3)
    return -(-n // step) * step


def row_window(start: int, n: int, total: int) -> tuple[int, int]:
    """(lo, p): a window of p = bucket(n) rows (at most all `total`) holding rows [start, start + n)."""
    p = min(bucket(n), total)
    return min(start, total - p), p


def rows_grouped_mm(x: torch.Tensor, w: torch.Tensor, starts: list[int], ends: list[int]) -> torch.Tensor:
    """y (M, N): the rows of expert e times w[e] (K, N), each product over a bucketed window."""
    total = x.shape[0]
    pieces = []
    for e, (s, t) in enumerate(zip(starts, ends)):
        if t == s:
            continue
        lo, p = row_window(s, t - s, total)
        pieces.append((x[lo : lo + p] @ w[e])[s - lo : t - lo])
    if ends[-1] < total:  # rows past the last expert's: zero (torch's op leaves them unset)
        pieces.append(x.new_zeros(total - ends[-1], w.shape[-1]))
    return torch.cat(pieces)


def contraction_grouped_mm(a: torch.Tensor, b: torch.Tensor, starts: list[int], ends: list[int]) -> torch.Tensor:
    """out (E, K, N): out[e] = a[:, rows of e] b[rows of e], each over a bucketed window of rows
    where b's rows outside the expert's are zero (an expert without rows gets zeros)."""
    total = a.shape[1]
    out = a.new_zeros(len(ends), a.shape[0], b.shape[1])
    for e, (s, t) in enumerate(zip(starts, ends)):
        if t == s:
            continue
        lo, p = row_window(s, t - s, total)
        if p == t - s:
            torch.mm(a[:, s:t], b[s:t], out=out[e])
            continue
        b_window = b[lo : lo + p].clone()
        b_window[: s - lo] = 0
        b_window[t - lo :] = 0
        torch.mm(a[:, lo : lo + p], b_window, out=out[e])
    return out
