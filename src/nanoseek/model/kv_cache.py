"""Static key/value caches, pre-allocated for `max_len` positions and written at an index.

Generation runs a prefill over the prompt (positions 0..P-1), then one decode step per new token
(position p). Each attention layer owns one cache object; the model builds them all with
`Transformer.make_cache(batch, max_len)`.

Dense cache per layer: K (B, H_kv, L, d_k) and V (B, H_kv, L, d_v): 2 * H_kv * d per token.
MLA latent cache per layer: c_KV (B, L, d_c) and the shared RoPE key k_R (B, L, d_r): d_c + d_r per
token, independent of the number of heads.
"""

from __future__ import annotations

import torch


class DenseKVCache:
    def __init__(self, batch: int, n_kv_heads: int, max_len: int, k_dim: int, v_dim: int,
                 dtype: torch.dtype, device=None):
        self.k = torch.zeros(batch, n_kv_heads, max_len, k_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, n_kv_heads, max_len, v_dim, dtype=dtype, device=device)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H_kv, T, d) at positions start..start+T-1; return the keys/values so far."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class LatentKVCache:
    def __init__(self, batch: int, max_len: int, latent_dim: int, rope_dim: int,
                 dtype: torch.dtype, device=None):
        self.latent = torch.zeros(batch, max_len, latent_dim, dtype=dtype, device=device)
        self.k_rope = torch.zeros(batch, max_len, rope_dim, dtype=dtype, device=device)

    @property
    def max_len(self) -> int:
        return self.latent.shape[1]

    def update(self, start: int, latent: torch.Tensor, k_rope: torch.Tensor):
        """Write latent (B, T, d_c) and k_rope (B, T, d_r); return both up to start+T."""
        end = start + latent.shape[1]
        self.latent[:, start:end] = latent
        self.k_rope[:, start:end] = k_rope
        return self.latent[:, :end], self.k_rope[:, :end]
