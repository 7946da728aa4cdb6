"""Matmul FLOPs by dtype: which products of a step run in bf16 and which in fp32, and where.

A TorchDispatchMode sees every aten op after autocast has chosen its dtypes, in the forward and in
the backward. Each matrix product is counted with its FLOPs and its inputs' dtype:
    mm / addmm (M,K)x(K,N):             2 M K N
    bmm / baddbmm (B,M,K)x(B,K,N):      2 B M K N
    _grouped_mm (M,K)x(E,K,N):          2 M K N        (each row meets one expert)
    scaled dot-product attention:       2 B H L S (E + Ev) forward; its backward op counted 2x that
`linear`, `matmul` and `einsum` reach these ops, so they are counted there. ModuleTracker names the
module each op ran in (forward and backward), so products kept in fp32 on purpose can be told apart.
`conversions` counts the dtype casts (calls and elements per module and direction): where a bf16
step pays for round trips through fp32.

    >>> import torch
    >>> with MatmulCounter() as c:
    ...     _ = torch.ones(2, 3) @ torch.ones(3, 4)
    >>> c.flops_by_dtype()
    {'float32': 48}
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.module_tracker import ModuleTracker

aten = torch.ops.aten

# routers choose experts from fp32 scores (DeepSeek-V3 computes gate logits in fp32; the balance
# bias is an fp32 buffer): a small share of the FLOPs, kept fp32 so expert choice does not flip
KEPT_FP32 = (r"(^|\.)gate$", r"(^|\.)router$", r"(^|\.)AttentionLogits$", r"(^|\.)TileProducts$")
# the C++ gathered attention (kernels/csrc, loaded on first use, so looked up by name): each of a
# query's H heads (q: (B, H, T, X)) meets its row's valid picks; backward counted 2x forward. Under
# bf16 it computes in bf16 where the CPU has AVX-512 BF16 (its loops use vdpbf16ps), elsewhere in
# fp32 on purpose.
NATIVE_OPS = {"gathered_attention": 1, "gathered_attention_backward": 2}
# modules that functions call outside the model's tree (ModuleTracker names them by their class):
# model/attention/core.py's AttentionLogits, the fp32 logits of bf16 attention on short rows on the
# CPU (bf16 values multiplied exactly and summed in fp32, as a bf16 GEMM with an fp32 output would),
# and kernels/block_attention.py's TileProducts, the block-sparse tiles' logits and dS products (fp32
# from the fp32 q and k, as AttentionLogits)
HELPER_MODULES = ("AttentionLogits", "TileProducts")


@dataclass
class MatmulRecord:
    op: str
    dtype: str  # the inputs' dtype ("mixed:a,b" when they differ)
    flops: int
    module: str  # the innermost module that ran it ("" outside any)
    dims: tuple = ()  # the product's sizes, sorted (matches a forward product to its backward ones)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shape(t) -> tuple:
    return tuple(t.shape)


def _mm(args):
    (m, k), (_, n) = _shape(args[0]), _shape(args[1])
    return 2 * m * k * n


def _bmm(args):
    (b, m, k), (_, _, n) = _shape(args[0]), _shape(args[1])
    return 2 * b * m * k * n


def _sdpa(args, factor=1):
    q, k, v = args[0], args[1], args[2]
    *batch, length, e = _shape(q)
    s, ev = _shape(k)[-2], _shape(v)[-1]
    n = 1
    for d in batch:
        n *= d
    return factor * 2 * n * length * s * (e + ev)


def _grouped(args):
    a, b = _shape(args[0]), _shape(args[1])
    if len(a) == 2 and len(b) == 3:
        return 2 * a[0] * a[1] * b[2]
    if len(a) == 2 and len(b) == 2:  # (K, M) x (M, N) per group: the weight gradient
        return 2 * a[0] * a[1] * b[1]
    return 2 * a[0] * a[1] * a[2] * b[-1]


def _op_flops() -> dict:
    table = {}
    for overload in (aten.mm.default, aten.mm.out):
        table[overload] = (_mm, (0, 1))
    for overload in (aten.bmm.default, aten.bmm.out):
        table[overload] = (_bmm, (0, 1))
    for overload in (aten.addmm.default, aten.addmm.out, aten.addmm_.default):  # in place: grad sums
        table[overload] = (lambda a: _mm(a[1:]), (1, 2))
    for overload in (aten.baddbmm.default, aten.baddbmm.out, aten.baddbmm_.default):
        table[overload] = (lambda a: _bmm(a[1:]), (1, 2))
    names = {
        "_scaled_dot_product_flash_attention_for_cpu": (_sdpa, (0, 1, 2)),
        "_scaled_dot_product_flash_attention": (_sdpa, (0, 1, 2)),
        "_scaled_dot_product_efficient_attention": (_sdpa, (0, 1, 2)),
        "_scaled_dot_product_cudnn_attention": (_sdpa, (0, 1, 2)),
        "_scaled_dot_product_flash_attention_for_cpu_backward": (lambda a: _sdpa(a[1:], 2), (1, 2, 3)),
        "_scaled_dot_product_flash_attention_backward": (lambda a: _sdpa(a[1:], 2), (1, 2, 3)),
        "_scaled_dot_product_efficient_attention_backward": (lambda a: _sdpa(a[1:], 2), (1, 2, 3)),
        "_grouped_mm": (_grouped, (0, 1)),
    }
    for name, entry in names.items():
        packet = getattr(aten, name, None)
        if packet is not None:
            table[packet.default] = entry
    return table


def _native_entry(func):
    factor = NATIVE_OPS.get(func.__name__.split(".")[0]) if func.namespace == "nanoseek" else None
    if factor is None:
        return None

    def flops(a) -> int:  # the valid picks only (a[5]): the kernel computes no others
        heads, width = _shape(a[0])[1], _shape(a[0])[-1]  # q (B, H, T, X), picks (B T, K)
        return factor * 2 * heads * int(a[5].sum()) * (width + a[3])

    return flops, (0, 1)


class MatmulCounter(TorchDispatchMode):
    """Counts matrix-product FLOPs by input dtype and module while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.records: list[MatmulRecord] = []
        self._table = _op_flops()
        self._tracker = ModuleTracker()
        self._signatures: dict = {}
        # dtype conversions (autocast's casts, .float(), .to()): (module, from, to) -> (calls, elements)
        self.conversions: dict[tuple[str, str, str], tuple[int, int]] = {}

    def __enter__(self):
        self._tracker.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._tracker.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is aten._to_copy.default and "dtype" in (kwargs or {}) and kwargs["dtype"] != args[0].dtype:
            key = (self._innermost(), _name(args[0].dtype), _name(kwargs["dtype"]))
            calls, elements = self.conversions.get(key, (0, 0))
            self.conversions[key] = (calls + 1, elements + args[0].numel())
        entry = self._table.get(func) or _native_entry(func)
        if entry is not None:
            flops_of, operands = entry
            dtypes = sorted({_name(args[i].dtype) for i in operands})
            dtype = dtypes[0] if len(dtypes) == 1 else "mixed:" + ",".join(dtypes)
            dims = tuple(sorted({d for i in operands[:2] for d in args[i].shape[-2:]}))
            self._signatures.clear()
            self.records.append(MatmulRecord(func.__name__, dtype, int(flops_of(args)), self._innermost(), dims))
        return func(*args, **(kwargs or {}))

    def _innermost(self) -> str:
        """The longest (deepest) module name among the active ones; a helper module called outside
        the model's tree (HELPER_MODULES) is appended to it as its last part."""
        parents = [p for p in self._tracker.parents if p != "Global"]
        helpers = [p for p in parents if p in HELPER_MODULES]
        tree = [p for p in parents if p not in HELPER_MODULES]
        name = max(tree, key=len) if tree else ""
        return ".".join([name, *helpers]) if name and helpers else name or "".join(helpers)

    # ------------------------------------------------------------------ summaries

    def kept_module(self, record: MatmulRecord, exclude: tuple[str, ...]) -> str | None:
        """The `exclude` module a product belongs to, or None. A backward product counts as its forward
        product's when sizes and dtype match (ModuleTracker may name a sibling branch during the backward,
        e.g. the shared experts for the router's gradient)."""
        if kept_fp32(record.module, exclude):
            return record.module
        if exclude and record.op.split(".")[0] in NATIVE_OPS:  # named by the op: "...self_attn.gathered_attention"
            return f"{record.module}.gathered_attention"
        if record.dtype == "bfloat16":
            return None
        return self._kept_signatures(exclude).get((record.dtype, record.dims))

    def _kept_signatures(self, exclude: tuple[str, ...]) -> dict:
        if exclude not in self._signatures:
            self._signatures[exclude] = {
                (r.dtype, r.dims): r.module for r in self.records if kept_fp32(r.module, exclude)
            }
        return self._signatures[exclude]

    def flops_by_dtype(self, exclude: tuple[str, ...] = ()) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for r in self.records:
            if self.kept_module(r, exclude) is None:
                out[r.dtype] += r.flops
        return dict(out)

    def kept_flops(self, exclude: tuple[str, ...] = KEPT_FP32) -> dict[str, int]:
        """FLOPs (forward + backward) per module kept out of the bf16 requirement."""
        out: dict[str, int] = defaultdict(int)
        for r in self.records:
            module = self.kept_module(r, exclude)
            if module is not None:
                out[module] += r.flops
        return dict(out)

    def bf16_fraction(self, exclude: tuple[str, ...] = KEPT_FP32) -> float:
        """Share of the matmul FLOPs (outside the `exclude` modules) whose inputs are all bf16."""
        by = self.flops_by_dtype(exclude)
        total = sum(by.values())
        return by.get("bfloat16", 0) / total if total else 1.0

    def not_bf16(self, exclude: tuple[str, ...] = KEPT_FP32) -> dict[tuple[str, str, str], int]:
        """FLOPs per (module, op, dtype) of the products that are not bf16, for finding them."""
        out: dict[tuple[str, str, str], int] = defaultdict(int)
        for r in self.records:
            if r.dtype != "bfloat16" and self.kept_module(r, exclude) is None:
                out[(r.module, r.op, r.dtype)] += r.flops
        return dict(out)


def kept_fp32(module: str, patterns: tuple[str, ...]) -> bool:
    """True when the module's name (or a part of it, "Transformer.blocks.0.moe.gate") matches a pattern."""
    name = module.split(" ")[0]
    return any(re.search(p, name) for p in patterns)


def count_training_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: str = "bfloat16"):
    """Count one forward + backward of `model(x, y)` under autocast on x's device; the counter."""
    from nanoseek.device import autocast

    with MatmulCounter() as counter:
        with autocast(x.device, dtype):
            out = model(x, y)
            loss = out.loss
            for value in out.aux.values():
                if isinstance(value, torch.Tensor) and value.requires_grad:
                    loss = loss + value
        loss.backward()
    return counter
