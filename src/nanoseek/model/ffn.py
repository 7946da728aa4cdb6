"""Position-wise feed-forward networks.

    ReLU (Vaswani):  FFN(x) = max(0, x W1 + b1) W2 + b2
    GELU (GPT-2):    FFN(x) = GELU(x W1 + b1) W2 + b2,   GELU(x) = x Phi(x)
    GELU, tanh form (OpenAI's GPT-2 checkpoints, HF "gelu_new"):
                     GELU(x) ~ 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    SwiGLU (Llama, DeepSeek dense layers):  FFN(x) = W_down (SiLU(W_gate x) * W_up x)
    DeepSeek-V4 clamps the pre-activations at a limit L: SiLU(min(W_gate x, L)) * clamp(W_up x, -L, L)

The SwiGLU gate and up projections are one fused matmul (`gate_up_proj`, gate rows first). The
model's default training path is `nanoseek.kernels.swiglu.FusedSwiGLU` (same weights and values,
the hidden recomputed in backward instead of kept).

    >>> MLP(64, 256, "relu")(torch.randn(2, 3, 64)).shape
    torch.Size([2, 3, 64])
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": partial(F.gelu, approximate="tanh")}


class MLP(nn.Module):
    """Two linear layers around a ReLU or GELU (exact or tanh form)."""

    def __init__(self, dim: int, hidden: int, activation: str = "relu", bias: bool = True):
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """SiLU(gate) * up, with V4's clamp when `limit` is set."""
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = False, limit: float | None = None):
        super().__init__()
        self.hidden, self.limit = hidden, limit
        self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(swiglu(gate, up, self.limit))


def make_dense_ffn(kind: str, dim: int, hidden: int, bias: bool) -> nn.Module:
    if kind == "swiglu":
        return SwiGLU(dim, hidden, bias)
    return MLP(dim, hidden, kind, bias)
