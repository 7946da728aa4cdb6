"""The output head and cross-entropy fused (model/loss.py's math), in chunks of rows, with the gradient
formed in the forward.

For N rows h_i (D wide), the head W (V x D) and targets y_i (rows with y_i = ignore_index do not count):
    z_i = W h_i,   loss = (1 / N_valid) sum_i (logsumexp(z_i) - z_i[y_i])
    dloss/dz_i = (softmax(z_i) - onehot(y_i)) / N_valid,   dloss/dh_i = W^T dz_i,   dloss/dW = sum_i dz_i h_i^T
A chunk of C rows forms its logits (C x V), adds its share of the loss and folds dz into dloss/dh
(N x D, kept) and dloss/dW (V x D, kept) at once; backward only scales those by the incoming
gradient. So the N x V logits, their log-softmax and their gradient are never held whole (at
seq 256, batch 8 and a 32K vocabulary that is 268 MB each), for the same matmul FLOPs as the
plain head + `F.cross_entropy` (the backward's two products move into the forward).

    >>> h, w, y = torch.randn(6, 4), torch.randn(10, 4), torch.tensor([1, 2, 3, -1, 5, 9])
    >>> torch.allclose(linear_cross_entropy(h, w, y), reference.linear_cross_entropy(h, w, y))
    True
"""

from __future__ import annotations

import torch

from nanoseek.model import loss as reference  # noqa: F401 (the docstring's example compares against it)

CHUNK_ELEMENTS = 1 << 24  # logits per chunk (64 MB in fp32): rows = this / vocabulary, at least 256
# (fewer rows per chunk make dloss/dW a sum of thin products, each a pass over the V x D gradient:
# with a few dozen rows per chunk at a 32K vocabulary the step is slower than the unfused head)


def chunk_rows(vocab: int) -> int:
    return max(256, CHUNK_ELEMENTS // vocab)


def chunk_loss_and_grad(h_CD, weight_VD, y_C, ignore_index: int, scale, with_grad: bool):
    """(sum of the chunk's losses, dloss/dz (C, V) scaled by `scale`, or None)."""
    z_CV = h_CD @ weight_VD.T
    z_CV = z_CV.to(torch.promote_types(z_CV.dtype, torch.float32))  # bf16 logits: the loss in fp32
    logp_CV = torch.log_softmax(z_CV, dim=-1)
    valid_C = y_C != ignore_index
    y_C = y_C.clamp(min=0)
    loss = -(logp_CV.gather(1, y_C[:, None])[:, 0] * valid_C).sum()
    if not with_grad:
        return loss, None
    dz_CV = logp_CV.exp_()  # softmax, in place
    dz_CV[torch.arange(len(y_C), device=y_C.device), y_C] -= 1.0
    return loss, dz_CV.mul_((valid_C.to(dz_CV.dtype) * scale)[:, None])


def head_loss_and_grads(h_ND, weight_VD, targets_N, ignore_index: int, want_h: bool, want_w: bool):
    """(mean loss, dloss/dh (N, D) or None, dloss/dW (V, D) or None), one chunk of rows at a time."""
    n, rows = h_ND.shape[0], chunk_rows(weight_VD.shape[0])
    acc = torch.promote_types(weight_VD.dtype, torch.float32)
    scale = 1.0 / (targets_N != ignore_index).sum().clamp(min=1).to(acc)
    grad_h = torch.empty_like(h_ND) if want_h else None
    grad_w = torch.zeros(weight_VD.shape, dtype=acc, device=weight_VD.device) if want_w else None
    total = torch.zeros((), dtype=acc, device=h_ND.device)
    autocasting = torch.is_autocast_enabled(h_ND.device.type)  # bf16 products even where h is fp32
    for a in range(0, n, rows):
        h_CD = h_ND[a : a + rows]
        loss, dz_CV = chunk_loss_and_grad(
            h_CD, weight_VD, targets_N[a : a + rows], ignore_index, scale, want_h or want_w
        )
        total += loss
        if dz_CV is None:
            continue
        dz_CV = dz_CV.to(h_CD.dtype)
        if want_h:
            grad_h[a : a + rows] = dz_CV @ weight_VD.to(h_CD.dtype)
        if want_w and dz_CV.dtype == grad_w.dtype and not autocasting:  # addmm_ would escape autocast
            grad_w.addmm_(dz_CV.T, h_CD)
        elif want_w:  # bf16 products into the fp32 sum
            grad_w.add_(dz_CV.T @ h_CD)
    return total * scale, grad_h, None if grad_w is None else grad_w.to(weight_VD.dtype)


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, weight_VD, targets_N, ignore_index: int):
        loss, grad_h, grad_w = head_loss_and_grads(
            h_ND, weight_VD, targets_N, ignore_index, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (
            None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype),
            None if grad_w is None else grad_w * grad_loss.to(grad_w.dtype),
            None,
            None,
        )


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1
) -> torch.Tensor:
    """Mean cross-entropy of the logits h @ weight^T against `targets`, never forming all logits.
    h (..., D), targets (...) of the same leading shape."""
    h_ND, targets_N = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(h_ND, weight, targets_N, ignore_index)
    return head_loss_and_grads(h_ND, weight, targets_N, ignore_index, False, False)[0]
