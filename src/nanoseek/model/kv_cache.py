"""Static key/value caches, pre-allocated for `max_len` positions and written at an index.

Generation runs a prefill over the prompt (positions 0..P-1), then one decode step per new token
(position p). Each attention layer owns one cache object; the model builds them all with
`Transformer.make_cache(batch, max_len)`.

Dense cache per layer: K (B, H_kv, L, d_k) and V (B, H_kv, L, d_v): 2 * H_kv * d per token.
MLA latent cache per layer: c_KV (B, L, d_c) and the shared RoPE key k_R (B, L, d_r): d_c + d_r per
token, independent of the number of heads.

Continuous batching (the server) keeps one cache of `max_batch` rows, one row per running request:
`rows(lo, hi, length)` is a view of rows lo..hi-1 and positions 0..length-1 (writes go through to
the whole cache), `move_row(src, dst)` packs the running rows together when one leaves, and
`update` accepts per-row positions (a LongTensor (B,)) for a decode step where each row sits at its
own position.
"""

from __future__ import annotations

import torch


def write_positions(buffer: torch.Tensor, start, new: torch.Tensor, time_dim: int) -> int:
    """Write `new` into `buffer` along `time_dim` at `start` (int, or per-row LongTensor (B,) for
    one new position per row); return the number of positions that are now visible."""
    if isinstance(start, torch.Tensor):
        rows = torch.arange(buffer.shape[0], device=buffer.device)
        index = (rows, slice(None), start) if time_dim == 2 else (rows, start)
        buffer[index] = new.select(time_dim, 0)
        return buffer.shape[time_dim]
    end = start + new.shape[time_dim]
    buffer.narrow(time_dim, start, new.shape[time_dim]).copy_(new)
    return end


class DenseKVCache:
    def __init__(
        self,
        batch: int,
        n_kv_heads: int,
        max_len: int,
        k_dim: int,
        v_dim: int,
        dtype: torch.dtype,
        device=None,
        *,
        buffers=None,
    ):
        if buffers is not None:
            self.k, self.v = buffers
            return
        self.k = torch.zeros(batch, n_kv_heads, max_len, k_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, n_kv_heads, max_len, v_dim, dtype=dtype, device=device)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, start, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H_kv, T, d) at positions start..start+T-1; return the keys/values so far."""
        write_positions(self.k, start, k, 2)
        end = write_positions(self.v, start, v, 2)
        return self.k[:, :, :end], self.v[:, :, :end]

    def rows(self, lo: int, hi: int, length: int | None = None) -> DenseKVCache:
        length = self.max_len if length is None else length
        return DenseKVCache(0, 0, 0, 0, 0, None, buffers=(self.k[lo:hi, :, :length], self.v[lo:hi, :, :length]))

    def move_row(self, src: int, dst: int) -> None:
        self.k[dst] = self.k[src]
        self.v[dst] = self.v[src]

    def select_rows(self, index: torch.Tensor) -> None:
        """Row i becomes row index[i] (beam search keeps the cache of the beams it extends)."""
        self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


class LatentKVCache:
    """MLA: [c_KV ; k_R] per token in one buffer `key` (B, L, d_c + d_r), so the absorbed decode
    reads its single key head without a copy; with DSA also the indexer's key k^I (B, L, d_I)."""

    def __init__(
        self,
        batch: int,
        max_len: int,
        latent_dim: int,
        rope_dim: int,
        dtype: torch.dtype,
        device=None,
        index_dim: int = 0,
        *,
        buffers=None,
    ):
        if buffers is not None:
            self.key, self.latent_dim, self.index_keys = buffers
            return
        self.latent_dim = latent_dim
        self.key = torch.zeros(batch, max_len, latent_dim + rope_dim, dtype=dtype, device=device)
        self.index_keys = torch.zeros(batch, max_len, index_dim, dtype=dtype, device=device) if index_dim else None

    @property
    def latent(self) -> torch.Tensor:
        return self.key[..., : self.latent_dim]

    @property
    def k_rope(self) -> torch.Tensor:
        return self.key[..., self.latent_dim :]

    @property
    def max_len(self) -> int:
        return self.key.shape[1]

    def update(self, start, latent: torch.Tensor, k_rope: torch.Tensor, index_keys: torch.Tensor | None = None):
        """Write latent (B, T, d_c), k_rope (B, T, d_r) (and index keys); return all up to start+T."""
        # one write into the base buffer (a write through two views would make a compiled graph
        # copy the whole buffer back)
        end = write_positions(self.key, start, torch.cat([latent, k_rope], dim=-1), 1)
        if index_keys is not None:
            write_positions(self.index_keys, start, index_keys, 1)
        return self.latent[:, :end], self.k_rope[:, :end], None if index_keys is None else self.index_keys[:, :end]

    def rows(self, lo: int, hi: int, length: int | None = None) -> LatentKVCache:
        length = self.max_len if length is None else length
        index_keys = None if self.index_keys is None else self.index_keys[lo:hi, :length]
        return LatentKVCache(0, 0, 0, 0, None, buffers=(self.key[lo:hi, :length], self.latent_dim, index_keys))

    def move_row(self, src: int, dst: int) -> None:
        for b in (self.key, self.index_keys):
            if b is not None:
                b[dst] = b[src]

    def select_rows(self, index: torch.Tensor) -> None:
        self.key = self.key.index_select(0, index)
        if self.index_keys is not None:
            self.index_keys = self.index_keys.index_select(0, index)


class CompressedKVCache:
    """DeepSeek-V4 attention: per token the shared key/value (its K == V) and, for CSA/HCA layers, the
    compressor's raw projections (kv, gate) so a window can be pooled once it closes; per window the
    pooled entry. A CSA layer keeps the same for its indexer at the indexer's width.

    Buffers (time on dim 1): kv (B, L, D_h); raw_kv, raw_gate (B, L, w); entries (B, L / m, D_h);
    index_raw_kv, index_raw_gate (B, L, 2 d_I); index_entries (B, L / m, d_I).
    """

    def __init__(self, buffers: dict[str, torch.Tensor]):
        self.buffers = buffers

    @classmethod
    def allocate(cls, batch: int, max_len: int, widths: dict[str, tuple[int, int]], dtype, device=None):
        """widths: name -> (positions per row, channels)."""
        return cls(
            {
                name: torch.zeros(batch, length, dim, dtype=dtype, device=device)
                for name, (length, dim) in widths.items()
            }
        )

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.buffers[name]

    @property
    def max_len(self) -> int:
        return self.buffers["kv"].shape[1]

    def write(self, name: str, start, new: torch.Tensor) -> int:
        return write_positions(self.buffers[name], start, new, 1)

    def rows(self, lo: int, hi: int, length: int | None = None) -> CompressedKVCache:
        """Rows lo..hi-1; per-token buffers cut at `length`, per-window ones kept whole (the attention
        reads only the windows its positions have closed)."""
        length = self.max_len if length is None else length
        return CompressedKVCache(
            {name: b[lo:hi, :length] if b.shape[1] == self.max_len else b[lo:hi] for name, b in self.buffers.items()}
        )

    def move_row(self, src: int, dst: int) -> None:
        for b in self.buffers.values():
            b[dst] = b[src]

    def select_rows(self, index: torch.Tensor) -> None:
        self.buffers = {name: b.index_select(0, index) for name, b in self.buffers.items()}
