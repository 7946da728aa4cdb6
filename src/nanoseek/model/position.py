"""Positional information: additive absolute encodings and rotary embeddings (RoPE, YaRN).

Sinusoidal (Vaswani et al.), added to the token embedding:
    PE[pos, 2i] = sin(pos / 10000^(2i/d)),  PE[pos, 2i+1] = cos(pos / 10000^(2i/d))
Learned: a trained table PE[pos] of shape (max_positions, d).

RoPE rotates pairs of query/key dimensions by an angle proportional to the position, so that
q_m . k_n depends on m - n only:
    inv_freq_i = theta^(-2i/d_r),  angle = pos * inv_freq_i,
    (x_a, x_b) -> (x_a cos - x_b sin,  x_b cos + x_a sin)
Two layouts choose which dimensions pair up: interleaved (2i, 2i+1), as DeepSeek checkpoints store
them, or half-split (i, i + d_r/2), as Llama does. The interleaved form here returns its output
de-interleaved ([evens | odds]); q and k are permuted identically, so q . k is unchanged.

YaRN extends the context by a factor s: with original length L0 and the ramp
    corr(r) = d_r * ln(L0 / (2 pi r)) / (2 ln theta),  low = floor(corr(beta_fast)),
    high = ceil(corr(beta_slow)),  ramp_i = clamp((i - low) / (high - low), 0, 1),
    inv_freq_i = inv_freq_i / s * ramp_i + inv_freq_i * (1 - ramp_i),
and cos/sin are multiplied by mscale(s, mscale) / mscale(s, mscale_all_dim), where
mscale(s, m) = 0.1 m ln s + 1. MLA's softmax scale is multiplied by mscale(s, mscale_all_dim)^2.

    >>> rope_inv_freq(4, 10000.0).tolist()
    [1.0, 0.009999999776482582]
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nanoseek.config import ModelConfig, mscale


def sinusoidal_table(max_positions: int, dim: int) -> torch.Tensor:
    pos = torch.arange(max_positions, dtype=torch.float32)[:, None]
    inv = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    table = torch.zeros(max_positions, dim)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv[: dim // 2])
    return table


class SinusoidalPosition(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        table = sinusoidal_table(config.max_position_embeddings, config.hidden_size)
        self.register_buffer("table", table, persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.table[positions]


class LearnedPosition(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.max_position_embeddings, config.hidden_size))

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.weight[positions]


ADDITIVE_POSITIONS = {"sinusoidal": SinusoidalPosition, "learned": LearnedPosition}


# ----------------------------------------------------------------------------------------- RoPE


def rope_inv_freq(dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies of RoPE over `dim` rotary dimensions, with optional YaRN scaling."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if not scaling or scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return inv_freq
    factor = float(scaling["factor"])
    original = scaling.get("original_max_position_embeddings", 4096)
    beta_fast, beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp)


def rope_attention_factor(scaling: dict | None) -> float:
    """Multiplier of cos/sin under YaRN (1.0 for every released DeepSeek config)."""
    if not scaling or scaling.get("rope_type", scaling.get("type", "default")) != "yarn":
        return 1.0
    factor = float(scaling["factor"])
    if "attention_factor" in scaling and scaling["attention_factor"] is not None:
        return float(scaling["attention_factor"])
    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if m and m_all:
        return mscale(factor, m) / mscale(factor, m_all)
    return mscale(factor)


def softmax_scale(config: ModelConfig, head_dim: int) -> float:
    """head_dim^-0.5, times mscale(s, mscale_all_dim)^2 under YaRN (the MLA correction)."""
    scale = head_dim**-0.5
    rs = config.rope_scaling
    if rs and rs.get("rope_type", rs.get("type")) == "yarn" and rs.get("mscale_all_dim"):
        scale *= mscale(float(rs["factor"]), float(rs["mscale_all_dim"])) ** 2
    return scale


class RotaryEmbedding(nn.Module):
    """cos/sin tables of shape (max_positions, d_r/2), shared by all layers."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.interleave = config.rope_interleave
        inv_freq = rope_inv_freq(config.rope_dim, config.rope_theta, config.rope_scaling)
        angles = torch.arange(config.max_position_embeddings, dtype=torch.float32)[:, None] * inv_freq
        factor = rope_attention_factor(config.rope_scaling)
        self.register_buffer("cos", angles.cos() * factor, persistent=False)
        self.register_buffer("sin", angles.sin() * factor, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions], self.sin[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate the last dim of x (..., T, d_r) by tables cos/sin (T, d_r/2). Keeps x's dtype.

    Per-row tables (B, T, d_r/2) (continuous batching) broadcast over the heads of x (B, H, T, d_r).
    """
    if cos.dim() == 3 and x.dim() == 4:
        cos, sin = cos[:, None], sin[:, None]
    if interleave:
        a, b = x[..., 0::2], x[..., 1::2]
    else:
        a, b = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


def seq_first_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables (T, d_r/2), or per-row (B, T, d_r/2), for x laid out (B, T, H, d_r):
    4-D, broadcast over the heads."""
    if cos.dim() == 2:
        return cos[None, :, None], sin[None, :, None]
    return cos[:, :, None], sin[:, :, None]
