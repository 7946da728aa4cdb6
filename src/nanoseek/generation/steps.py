"""The two model calls of generation (gpt-fast's split): prefill the prompt into a static cache, then
decode one token at a time against it.

    prefill:      logits_B,V = model(prompt_B,P, positions 0..P-1, cache)[:, -1]     (cache filled;
                  after a cached prefix of m positions: positions m..P-1)
    decode step:  logits_B,V = model(token_B,1, position pos, cache)[:, -1]           (cache[pos] written)
"""

from __future__ import annotations

import torch


def prefill(model, input_ids: torch.Tensor, cache: list, start: int = 0) -> torch.Tensor:
    """Run the prompt (B, P) at positions start..start+P-1 (the cache holds positions 0..start-1),
    filling `cache`; return the last logits (B, V)."""
    return model(input_ids, cache=cache, start=start, last_only=True).logits[:, -1]


def decode_step(model, token: torch.Tensor, cache: list, pos: int | torch.Tensor) -> torch.Tensor:
    """Run one token (B, 1) at position `pos` (or per-row positions (B,)) against the cache; return
    its logits (B, V)."""
    return model(token, cache=cache, start=pos).logits[:, -1]
