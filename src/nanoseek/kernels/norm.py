"""RMSNorm's training fast path: y = w * (x r),  r = rsqrt(mean(x^2) + eps)  (model/norm.py's math).

With autograd recording, `FusedRMSNorm` runs as `RMSNormFunction`, which keeps only x and r (one
value per token) for backward; without (inference, decoding), as model/norm.py's RMSNorm (torch's
fused `F.rms_norm`, whose dispatch costs less than the Function's on one token).

Inside `recomputed_norm_outputs()` (the model's eager training forward enters it when
`config.kernels`) an RMSNorm output is never kept for backward: every op that would save it (the
next linear, the MoE router and experts, the fused head + loss) saves a recipe instead (x and r,
which the norm keeps anyway, and its weight), and the output is recomputed, bit for bit, when
backward unpacks it. That frees one (tokens x width) tensor per norm: for llama-small at 8 x 256
tokens, 16 of its 112 MB of saved activations.

    >>> norm = FusedRMSNorm(8)
    >>> norm(torch.ones(2, 8, requires_grad=True)).grad_fn.name()
    'RMSNormFunctionBackward'
"""

import contextlib
import threading
import weakref

import torch

from nanoseek.model.norm import RMSNorm


class FusedRMSNorm(RMSNorm):
    """RMSNorm (same weight, same values) that trains through `RMSNormFunction`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return RMSNormFunction.apply(x, self.weight, self.eps)
        return super().forward(x)


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm that keeps only x and r = rsqrt(mean(x^2) + eps) (one value per token) for backward
    and recomputes the normalized x there. With n = x r and g the gradient reaching n,
        dL/dx = r (g - x r^2 mean(g x)),   dL/dw = sum over tokens of grad * n."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        out, rstd = rms_norm_parts(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        if active_recipes() is not None:
            remember_recipe(out, x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        x32 = x.float()
        normed = (x32 * rstd).to(x.dtype)
        grad_w = (grad * normed).reshape(-1, weight.shape[0]).sum(0).to(weight.dtype)
        g32 = (grad * weight).to(x.dtype).float()  # the gradient reaching n, rounded as n is
        grad_x = rstd * (g32 - x32 * rstd.square() * (g32 * x32).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_w, None


def rms_norm_parts(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(w * (x r) in x's dtype, r = rsqrt(mean(x^2) + eps) in fp32)."""
    rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return rms_norm_output(x, weight, rstd), rstd


def rms_norm_output(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """w * (x r) in x's dtype: the forward's last step, and the whole of a recomputation (bit-identical)."""
    return weight * (x.float() * rstd).to(x.dtype)


# ---------------------------------------------------------------------------- recomputed outputs

_local = threading.local()  # .recipes: storage address -> (weakref to the norm output, recipe), per thread


def active_recipes() -> dict | None:
    return getattr(_local, "recipes", None)


@contextlib.contextmanager
def recomputed_norm_outputs():
    """While active, RMSNorm outputs saved for backward are saved as recipes and recomputed in
    backward (see the module docstring). Re-entrant and per thread. It steps aside (changes
    nothing) when saved-tensor hooks are already installed (the caller's own, e.g.
    `torch.autograd.graph.save_on_cpu`, which would otherwise stop seeing the model's tensors) or
    disabled (torch.func transforms)."""
    if active_recipes() is not None or not saved_tensor_hooks_free():
        yield
        return
    _local.recipes = {}
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack_saved, unpack_saved):
            yield
    finally:
        _local.recipes = None


def saved_tensor_hooks_free() -> bool:
    """No saved-tensor hooks are installed, and installing them is allowed (False when torch's
    private probes are missing: then stay out of the way)."""
    autograd = torch._C._autograd
    enabled = getattr(autograd, "_saved_tensors_hooks_is_enabled", None)
    top = getattr(autograd, "_top_saved_tensors_default_hooks", None)
    return enabled is not None and top is not None and enabled() and top(True) is None


def remember_recipe(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> None:
    table = active_recipes()
    key = out.untyped_storage().data_ptr()
    # the entry dies with the output, so a later tensor at the same address never matches it
    ref = weakref.ref(out, lambda _, key=key: table.pop(key, None) if table.get(key, (None,))[0] is _ else None)
    table[key] = (ref, (x, weight, rstd, x._version, weight._version), out._version)


def pack_saved(t: torch.Tensor):
    """A recipe for a norm output, else the tensor without its graph: autograd re-attaches the graph
    when it unpacks, and a node that saves its own output (topk, amax, softmax, ...) would otherwise
    hold itself through the packed tensor, a cycle through C++ that Python's collector cannot free:
    a graph that backward never runs (the indexers' top-k over scores with a graph) leaked ~40 MB
    a training step."""
    table = active_recipes()
    entry = table.get(t.untyped_storage().data_ptr()) if table is not None else None
    if entry is None:
        return t.detach()
    out = entry[0]()
    # the output itself, unmodified (an in-place edit bumps the version its views share)
    if out is None or t.dtype != out.dtype or t._version != entry[2]:
        return t.detach()
    return entry[1], t.shape, t.stride(), t.storage_offset()


def unpack_saved(packed):
    if isinstance(packed, torch.Tensor):
        return packed
    (x, weight, rstd, x_version, w_version), view_shape, stride, offset = packed
    if x._version != x_version or weight._version != w_version:
        raise RuntimeError(
            "an RMSNorm input or weight was modified in place between forward and backward; "
            "its output cannot be recomputed"
        )
    with torch.no_grad():
        out = rms_norm_output(x, weight, rstd)
    return out.as_strided(view_shape, stride, offset)  # the saved tensor may be a view of the output
