"""Multi-head attention (MHA) and its grouped forms (GQA, MQA).

    MHA(x) = Concat_i(Attention(x W_i^Q, x W_i^K, x W_i^V)) W^O,   Attention as in core.py

Q, K and V come from one fused projection. With grouped-query attention (GQA) each of the
H_kv key/value heads serves H / H_kv query heads; MQA is H_kv = 1. Rotary positions, when
configured, rotate q and k before the product; a distance bias (ALiBi, T5), when configured, comes
in the place of the rotary tables and is added to the logits.

    >>> cfg = ModelConfig.from_preset("gpt2-tiny")
    >>> MultiHeadAttention(cfg)(torch.randn(1, 5, 64)).shape
    torch.Size([1, 5, 64])
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.attention.core import allowed_keys, attention_probs, causal_attention, layer_window
from nanoseek.model.kv_cache import DenseKVCache
from nanoseek.model.position import DistanceBias, apply_rope, seq_first_tables


class MultiHeadAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.window = layer_window(config, layer)
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.attn_head_dim
        self.dropout = config.attention_dropout
        self.interleave = config.rope_interleave
        self.scale = self.head_dim**-0.5  # no YaRN correction here: that one is MLA's (as in transformers)
        qkv_out = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, qkv_out, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)

    def make_cache(self, batch: int, max_len: int, dtype, device) -> DenseKVCache:
        return DenseKVCache(batch, self.n_kv_heads, max_len, self.head_dim, self.head_dim, dtype, device)

    def forward(
        self, x: torch.Tensor, rope=None, cache: DenseKVCache | None = None, start: int | torch.Tensor = 0
    ) -> torch.Tensor:
        q, k, v = self.project(x, rope)
        if cache is not None:
            k, v = cache.update(start, k, v)
        dropout = self.dropout if self.training else 0.0
        bias = rope if isinstance(rope, DistanceBias) else None  # ALiBi / T5: added to the logits
        return self.output(self.attend(q, k, v, start, dropout, bias))

    def attend(self, q, k, v, start, dropout: float, bias) -> torch.Tensor:
        """Causal (or sliding-window) attention of q over k, v; kernels/window.py's subclass runs a
        window as tiles on the CPU."""
        return causal_attention(q, k, v, start, self.scale, dropout, self.window, bias=bias)

    def project(self, x: torch.Tensor, rope=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> q (B, H, T, d), k and v (B, H_kv, T, d), rotated when `rope` is given."""
        b, t, _ = x.shape
        hd = self.head_dim
        q, k, v = self.qkv_proj(x).split([self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd], dim=-1)
        q = q.view(b, t, self.n_heads, hd)
        k = k.view(b, t, self.n_kv_heads, hd)
        v = v.view(b, t, self.n_kv_heads, hd)
        bias = rope if isinstance(rope, DistanceBias) else None
        if rope is not None and bias is None:  # rotated in (B, T, H, d) layout, so SDPA's output comes back in it too
            cos, sin = seq_first_tables(*rope)
            q, k = apply_rope(q, cos, sin, self.interleave), apply_rope(k, cos, sin, self.interleave)
            if torch.is_grad_enabled() and v.requires_grad:  # a view would keep all of qkv for backward
                v = v.contiguous()
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, d) views

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """The heads' outputs y (B, H, T, d) concatenated and projected: (B, T, D)."""
        b, _, t, _ = y.shape
        # a view when y is laid out (B, T, H, d), as SDPA returns it for such q: no copy kept for o_proj
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    @torch.no_grad()
    def attention_map(self, x: torch.Tensor, rope=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights (B, H, T, T), allowed keys (B, T, T)) for a whole sequence from position 0."""
        b, t, _ = x.shape
        hd = self.head_dim
        q, k, _ = self.qkv_proj(x).split([self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd], dim=-1)
        q = q.view(b, t, self.n_heads, hd).transpose(1, 2)
        k = k.view(b, t, self.n_kv_heads, hd).transpose(1, 2)
        bias = rope if isinstance(rope, DistanceBias) else None
        if rope is not None and bias is None:
            q, k = apply_rope(q, *rope, self.interleave), apply_rope(k, *rope, self.interleave)
        allowed = allowed_keys(t, self.window, x.device).expand(b, t, t)
        logit_bias = (
            None if bias is None else bias(torch.arange(t, device=x.device)[:, None] - torch.arange(t, device=x.device))
        )
        return attention_probs(q, k, allowed[:, None], self.scale, logit_bias), allowed
