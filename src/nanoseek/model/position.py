"""Positional information: additive absolute encodings, rotary embeddings (RoPE and its scalings) and
biases on the attention logits by distance (ALiBi, T5's relative bias).

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

Scaled RoPE (`rope_scaling`, the kinds transformers implements; s = `factor`, L0 = the original
context `original_max_position_embeddings`, default the model's, f_i = theta^(-2i/d_r)):
  linear   f_i / s                                        (positions interpolated by s)
  dynamic  f_i under a base grown with the length L of the sequence once L > L0 (NTK-aware):
           theta' = theta * (s L / L0 - (s - 1))^(d_r / (d_r - 2)),  f_i = theta'^(-2i/d_r)
  yarn     with the ramp corr(r) = d_r ln(L0 / (2 pi r)) / (2 ln theta), low = floor(corr(beta_fast)),
           high = ceil(corr(beta_slow)) (no floor/ceil when truncate=false),
           ramp_i = clamp((i - low) / (high - low), 0, 1):  f_i / s * ramp_i + f_i * (1 - ramp_i);
           cos/sin times mscale(s, mscale) / mscale(s, mscale_all_dim) (or `attention_factor`),
           mscale(s, m) = 0.1 m ln s + 1
  llama3   by wavelength w_i = 2 pi / f_i, with bands L0 / low_freq_factor > L0 / high_freq_factor:
           w_i above the first: f_i / s;  below the second: f_i;  between: (1 - a) f_i / s + a f_i,
           a = (L0 / w_i - low_freq_factor) / (high_freq_factor - low_freq_factor)
  longrope f_i / short_factor_i, or f_i / long_factor_i once L > L0; cos/sin times
           sqrt(1 + ln s / ln L0) (or `attention_factor`), s = max_position_embeddings / L0 if unset
MLA's softmax scale is multiplied by mscale(s, mscale_all_dim)^2 under any scaled kind that sets it.

Distance biases add b_h(i - j) to the logit of query i and key j in head h (no position enters the
embeddings or q/k); the attention passes the bias to SDPA as a float mask:
    softmax(q_i k_j / sqrt(d) + b_h(i - j) + M[i, j])
  alibi  b_h(n) = -m_h n, fixed slopes m_h = 2^(-8h/H) for h = 1..H (Press et al.); H not a power of
         two: the slopes of the largest power of two P < H, then every other slope of 2P, the first H - P
  t5     b_h(n) = B[bucket(n), h], B a learned (num_buckets, H) table shared by all layers (Raffel et al.,
         causal: only n >= 0): with E = num_buckets / 2 and D = max_distance,
         bucket(n) = n for n < E, else min(E + floor(ln(n / E) / ln(D / E) * E), num_buckets - 1)

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


def rope_kind(scaling: dict | None) -> str:
    """The rope_type of a `rope_scaling` dict ("default" when there is none)."""
    if not scaling:
        return "default"
    return scaling.get("rope_type", scaling.get("type", "default")) or "default"


def original_length(scaling: dict | None, max_positions: int | None) -> int:
    """The pre-training context the scaling extends: `original_max_position_embeddings`, else the model's."""
    value = (scaling or {}).get("original_max_position_embeddings") or max_positions
    return int(value) if value else 4096


def _yarn_inv_freq(inv_freq: torch.Tensor, dim: int, theta: float, scaling: dict, max_positions) -> torch.Tensor:
    original = original_length(scaling, max_positions)
    factor = float(scaling.get("factor") or (max_positions or original) / original)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict, max_positions) -> torch.Tensor:
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = original_length(scaling, max_positions)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < original / high) & ~(wavelen > original / low)
    return torch.where(medium, smoothed, scaled)


def rope_inv_freq(
    dim: int, theta: float, scaling: dict | None = None, max_positions: int | None = None, long: bool = False
) -> torch.Tensor:
    """Inverse frequencies of RoPE over `dim` rotary dimensions under `scaling` (see the module docstring).

    `dynamic` gives the unscaled frequencies (those it uses up to the original length; `dynamic_inv_freq`
    gives them beyond); `longrope` the short factors' frequencies, or with `long` the long factors'."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    kind = rope_kind(scaling)
    if kind == "longrope":
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)
        return 1.0 / (factors * theta**exponents)
    inv_freq = 1.0 / theta**exponents
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling, max_positions)
    if kind == "yarn":
        return _yarn_inv_freq(inv_freq, dim, theta, scaling, max_positions)
    return inv_freq  # default, dynamic


def dynamic_inv_freq(dim: int, theta: float, factor: float, original: int, seq_len: torch.Tensor) -> torch.Tensor:
    """Dynamic NTK frequencies for sequences of length `seq_len` (a tensor (..., 1); >= original)."""
    length = seq_len.clamp(min=original).float()
    base = theta * ((factor * length / original) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=seq_len.device) / dim)


def rope_attention_factor(scaling: dict | None, max_positions: int | None = None) -> float:
    """Multiplier of cos/sin: YaRN's mscale ratio (1.0 for every released DeepSeek config), LongRoPE's
    sqrt(1 + ln s / ln L0); 1.0 for the other kinds."""
    kind = rope_kind(scaling)
    if kind not in ("yarn", "longrope"):
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = original_length(scaling, max_positions)
    factor = float(scaling.get("factor") or (max_positions or original) / original)
    if kind == "longrope":
        return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if m and m_all:
        return mscale(factor, m) / mscale(factor, m_all)
    return mscale(factor)


def softmax_scale(config: ModelConfig, head_dim: int) -> float:
    """head_dim^-0.5, times mscale(s, mscale_all_dim)^2 under a scaled RoPE that sets `mscale_all_dim`
    (the MLA correction; Llama-style attention uses head_dim^-0.5 alone)."""
    scale = head_dim**-0.5
    rs = config.rope_scaling
    if rope_kind(rs) != "default" and rs.get("mscale_all_dim"):
        scale *= mscale(float(rs["factor"]), float(rs["mscale_all_dim"])) ** 2
    return scale


def rope_tables(inv_freq: torch.Tensor, max_positions: int, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq
    return angles.cos() * factor, angles.sin() * factor


class RotaryEmbedding(nn.Module):
    """cos/sin tables of shape (max_positions, d_r/2), shared by all layers.

    The length-dependent kinds switch tables when a sequence (a row, under per-row positions) passes
    the original length: `longrope` to its long factors' table, `dynamic` to frequencies computed for
    that length. The switch is a `torch.where` on tensors: no host sync, one graph when compiled."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.interleave = config.rope_interleave
        scaling, n = config.rope_scaling, config.max_position_embeddings
        self.kind = rope_kind(scaling)
        self.dim, self.theta, self.original = config.rope_dim, config.rope_theta, original_length(scaling, n)
        factor = rope_attention_factor(scaling, n)
        cos, sin = rope_tables(rope_inv_freq(self.dim, self.theta, scaling, n), n, factor)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        if self.kind == "longrope":
            cos, sin = rope_tables(rope_inv_freq(self.dim, self.theta, scaling, n, long=True), n, factor)
            self.register_buffer("cos_long", cos, persistent=False)
            self.register_buffer("sin_long", sin, persistent=False)
        self.scale_factor = float(scaling["factor"]) if self.kind == "dynamic" else 1.0

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.cos[positions], self.sin[positions]
        if self.kind not in ("dynamic", "longrope"):
            return cos, sin
        seq_len = positions.amax(-1, keepdim=True) + 1  # (1,) or per row (B, 1)
        if self.kind == "longrope":
            cos_long, sin_long = self.cos_long[positions], self.sin_long[positions]
        else:
            inv_freq = dynamic_inv_freq(self.dim, self.theta, self.scale_factor, self.original, seq_len)
            angles = positions[..., None].float() * inv_freq[..., None, :]
            cos_long, sin_long = angles.cos(), angles.sin()
        longer = (seq_len > self.original)[..., None]
        return torch.where(longer, cos_long, cos), torch.where(longer, sin_long, sin)


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


# ------------------------------------------------------------------------------ distance biases


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi's head slopes: the geometric sequence 2^(-8/P), 2^(-16/P), ... for P = n_heads when a
    power of two; else the P = 2^floor(log2 H) slopes, then the odd-numbered slopes of 2P.

    >>> alibi_slopes(2).tolist()
    [0.0625, 0.00390625]
    """

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    p = 2 ** int(math.floor(math.log2(n_heads)))
    slopes = power_of_two(p) + power_of_two(2 * p)[0::2][: n_heads - p]
    return torch.tensor(slopes, dtype=torch.float32)


def t5_buckets(distance: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's causal bucket of each distance n = i - j (negative ones, which the causal mask hides, as 0):
    exact below num_buckets / 2, then logarithmic up to max_distance, the last bucket beyond."""
    n = distance.clamp(min=0)
    exact = num_buckets // 2
    log_ratio = torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    large = (exact + (log_ratio * (num_buckets - exact)).long()).clamp(max=num_buckets - 1)
    return torch.where(n < exact, n, large)


class DistanceBias(nn.Module):
    """A bias on the attention logits that depends on the distance i - j only: called with a
    LongTensor of distances (...), returns the float bias (H, ...)."""


class ALiBi(DistanceBias):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(config.num_attention_heads), persistent=False)

    def forward(self, distance: torch.Tensor) -> torch.Tensor:
        slopes = self.slopes.view(-1, *([1] * distance.dim()))
        return -slopes * distance.to(slopes.dtype)


class T5RelativeBias(DistanceBias):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.relative_attention_bias = nn.Embedding(self.num_buckets, config.num_attention_heads)

    def forward(self, distance: torch.Tensor) -> torch.Tensor:
        bias = self.relative_attention_bias(t5_buckets(distance, self.num_buckets, self.max_distance))
        return bias.movedim(-1, 0)


DISTANCE_BIASES = {"alibi": ALiBi, "t5": T5RelativeBias}
