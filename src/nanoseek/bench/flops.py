"""Counted FLOPs: `torch.utils.flop_counter.FlopCounterMode`, with the attention kernels it misses.

FlopCounterMode counts each matrix product it sees (mm, addmm, bmm, baddbmm, and CUDA's SDPA
kernels) at 2 FLOPs per multiply-add; elementwise work (softmax, masks, gathers, top-k) is not
counted. Two gaps for attention, filled here:

* the CPU's fused kernel (`_scaled_dot_product_flash_attention_for_cpu` and its backward) has no
  formula there, so it would count 0;
* its SDPA formulas count every query-key pair even under `is_causal`, where the kernels skip the
  blocks above the diagonal.

Here every SDPA kernel counts, per query head, for P query-key pairs (P = S_q * S_k, or under
`is_causal` the pairs (i, j) with j <= i, top-left aligned as SDPA's is_causal is):

    forward   2 P d_qk + 2 P d_v                      (Q K^T, then P V)
    backward  2 P d_qk (recomputed scores) + 2 P d_v (dP = dO V^T) + 2 P d_v (dV = P^T dO)
              + 2 P d_qk (dQ = dS K) + 2 P d_qk (dK = dS^T Q)

An explicit mask (boolean or float) counts all S_q * S_k pairs: the kernels compute them all.
The C++ gathered attention (kernels/csrc, DSA's and V4's picks; once loaded in the process) counts
the same way for the pairs it computes, rows x heads x valid picks (it skips the invalid ones).

    >>> q = torch.zeros(1, 2, 4, 8)
    >>> count_flops(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True))
    640
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: F401 (the doctest)
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def attention_pairs(s_q: int, s_k: int, causal: bool) -> int:
    """Query-key pairs an SDPA kernel computes: all, or under is_causal those with key j <= query i."""
    if not causal:
        return s_q * s_k
    full = min(s_q, s_k)  # queries 0..full-1 see j + 1 keys; the rest see all S_k
    return full * (full + 1) // 2 + (s_q - full) * s_k


def _flops(q_shape, k_shape, v_shape, causal: bool, backward: bool) -> int:
    b, h, s_q, d_qk = q_shape
    s_k, d_v = k_shape[-2], v_shape[-1]
    pairs = b * h * attention_pairs(s_q, s_k, causal)
    if backward:
        return 2 * pairs * (3 * d_qk + 2 * d_v)
    return 2 * pairs * (d_qk + d_v)


def _arg(args, kwargs, index: int, name: str, default=None):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _forward(causal_index: int):
    def formula(query, key, value, *args, out_shape=None, **kwargs):
        causal = bool(_arg(args, kwargs, causal_index - 3, "is_causal", False))
        return _flops(query, key, value, causal, backward=False)

    return formula


def _backward(causal_index: int):
    def formula(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        causal = bool(_arg(args, kwargs, causal_index - 4, "is_causal", False))
        return _flops(query, key, value, causal, backward=True)

    return formula


# position of is_causal among each kernel's arguments (its schema)
SDPA_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _forward(4),
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _backward(7),
    aten._scaled_dot_product_flash_attention: _forward(4),
    aten._scaled_dot_product_flash_attention_backward: _backward(11),
    aten._scaled_dot_product_efficient_attention: _forward(6),
    aten._scaled_dot_product_efficient_attention_backward: _backward(11),
}


def _gathered(backward: bool):
    def formula(q, k, v, d_v, picked, valid, *args, out_shape=None, **kwargs):
        heads, d_qk = q.shape[1], q.shape[-1]  # q (B, H, T, X): each of a query's H heads meets its valid picks
        pairs = heads * int(valid.sum())  # picks (B T, K): one row per query
        return 2 * pairs * ((3 * d_qk + 2 * d_v) if backward else (d_qk + d_v))

    formula._get_raw = True  # the tensors themselves: only the valid picks are computed
    return formula


def native_formulas() -> dict:
    """Formulas for the C++ kernels' ops registered in this process (none before they are loaded)."""
    try:
        ops = torch.ops.nanoseek
        return {ops.gathered_attention: _gathered(False), ops.gathered_attention_backward: _gathered(True)}
    except (AttributeError, RuntimeError):
        return {}


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode (no printout) that also counts the SDPA kernels and the C++ kernels as above."""
    return FlopCounterMode(display=False, custom_mapping={**SDPA_FORMULAS, **native_formulas()})


def flops_by_op(counter: FlopCounterMode) -> dict[str, int]:
    """A finished counter's FLOPs per op kind: "sdpa" (every SDPA kernel), "mm", "bmm", ... ."""
    totals: dict[str, int] = {}
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        name = "sdpa" if "scaled_dot_product" in str(op) else str(op).split(".")[-1]
        name = "gathered_attention" if name.startswith("gathered_attention") else name
        totals[name] = totals.get(name, 0) + flops
    return totals


def count_flops(fn) -> int:
    """FLOPs that calling `fn()` performs, counted."""
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops()
