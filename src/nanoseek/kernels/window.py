"""Sliding-window layers through block-sparse tiles on the CPU (kernels/block_attention.py).

A "sliding" layer's query t attends to keys t - w + 1 .. t (model/attention/core.py, banded SDPA).
`TiledWindowAttention` (MHA/GQA/MQA) and kernels/dsa.py's `SparseLatentAttention` (MLA) run it as
`sliding_window_attention`: query blocks of 64 tokens over the 64-token key blocks their window
touches, with the query heads of each key head folded into the rows, where that pays (see there);
elsewhere, with a distance bias (ALiBi, T5) or with dropout, the reference's SDPA.

    >>> from nanoseek import ModelConfig, Transformer
    >>> model = Transformer(ModelConfig.from_preset("llama-tiny", sparse="sliding", sliding_window=8))
    >>> type(model.layers[0].self_attn).__name__
    'TiledWindowAttention'
"""

from __future__ import annotations

import torch

from nanoseek.kernels.block_attention import sliding_window_attention
from nanoseek.model.attention.mha import MultiHeadAttention


def tiled_window(module, q, k, v, start, dropout: float, extra) -> torch.Tensor | None:
    """The window through the tiles, or None where the reference runs (no window, a bias or kept-key
    mask in `extra`, dropout, per-row positions)."""
    if module.window is None or extra is not None or dropout or isinstance(start, torch.Tensor):
        return None
    return sliding_window_attention(q, k, v, start, module.window, module.scale)


class TiledWindowAttention(MultiHeadAttention):
    """MultiHeadAttention whose sliding window runs as tiles on the CPU (`sliding_window_attention`)."""

    def attend(self, q, k, v, start, dropout: float, bias) -> torch.Tensor:
        out = tiled_window(self, q, k, v, start, dropout, bias)
        return super().attend(q, k, v, start, dropout, bias) if out is None else out
