"""Normalization layers.

LayerNorm:  y = (x - mean(x)) / sqrt(var(x) + eps) * w + b
RMSNorm:    y = w * (x / sqrt(mean(x^2) + eps))

RMSNorm follows the Hugging Face DeepSeek/Llama order: normalize in float32, cast back to the input
dtype, then multiply by the weight (so bf16 runs round like the reference). The model's default
training path is `nanoseek.kernels.norm.FusedRMSNorm`, which computes the same with less memory.

    >>> RMSNorm(8)(torch.ones(2, 8)).shape
    torch.Size([2, 8])
"""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm (fused kernel), constructed from (dim, eps) like RMSNorm."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__(dim, eps=eps)


NORMS = {"layernorm": LayerNorm, "rmsnorm": RMSNorm}


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    return NORMS[kind](dim, eps)
