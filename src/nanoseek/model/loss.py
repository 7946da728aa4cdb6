"""The output head and the mean cross-entropy of next-token prediction.

For N rows h_i (D wide), the head W (V x D) and targets y_i (rows with y_i = ignore_index do not count):
    z_i = W h_i,   loss = (1 / N_valid) sum_i (logsumexp(z_i) - z_i[y_i])
With label smoothing eps (Szegedy et al. 2016; Vaswani et al. use 0.1) the target is (1 - eps) one-hot + eps
uniform over the V classes:
    loss_i = (1 - eps) (logsumexp(z_i) - z_i[y_i]) + eps (logsumexp(z_i) - mean_v z_i[v])

This forms all N x V logits (in fp32 for the loss). The model's default training path is
`nanoseek.kernels.cross_entropy.linear_cross_entropy`, which never holds them whole.

    >>> h, w, y = torch.randn(6, 4), torch.randn(10, 4), torch.tensor([1, 2, 3, -1, 5, 9])
    >>> linear_cross_entropy(h, w, y).shape
    torch.Size([])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -1,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy of the logits h @ weight^T against `targets`. h (..., D), targets (...) of
    the same leading shape."""
    logits = h.reshape(-1, h.shape[-1]) @ weight.T
    return F.cross_entropy(
        logits.float(), targets.reshape(-1), ignore_index=ignore_index, label_smoothing=label_smoothing
    )
