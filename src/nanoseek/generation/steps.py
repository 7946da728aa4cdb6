"""The two model calls of generation (gpt-fast's split): prefill the prompt into a static cache, then
decode one token at a time against it.

    prefill:      logits_B,V = model(prompt_B,P, positions 0..P-1, cache)[:, -1]     (cache filled;
                  after a cached prefix of m positions: positions m..P-1; prompts of different
                  lengths: right-padded, each row's logits at its own last token)
    decode step:  logits_B,V = model(token_B,1, position pos, cache)[:, -1]           (cache[pos] written)
"""

from __future__ import annotations

import torch


def prefill(model, input_ids: torch.Tensor, cache: list, start: int = 0) -> torch.Tensor:
    """Run the prompt (B, P) at positions start..start+P-1 (the cache holds positions 0..start-1),
    filling `cache`; return the last logits (B, V)."""
    return model(input_ids, cache=cache, start=start, last_only=True).logits[:, -1]


def prefill_rows(model, prompts: list[list[int]], cache: list, start: int = 0) -> torch.Tensor:
    """Prompts of different lengths in one batch (row b of `cache` gets prompt b at positions
    start..start+P_b-1): right-padded with token 0 to the longest, run once, and the logits (B, V)
    taken at each prompt's own last token (the final norm and head applied to those rows alone).

    The padding writes cache entries past a shorter prompt's end. That is harmless only where every
    reader of the cache masks keys by position (the dense and latent caches: a query at p sees
    keys 0..p), since the row's next decode step writes position P_b before any query can see it;
    caches that summarize blocks of positions (NSA, compressed) must be given prompts of one length.
    Equal lengths are exactly `prefill`."""
    longest = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    ids = torch.tensor([p + [0] * (longest - len(p)) for p in prompts], device=device)
    if all(len(p) == longest for p in prompts):
        return prefill(model, ids, cache, start)
    hidden = model(ids, cache=cache, start=start, last_only=True).hidden
    last = torch.tensor([len(p) - 1 for p in prompts], device=device)
    return model.lm_head(model.norm(hidden[torch.arange(len(prompts), device=device), last]))


def decode_step(model, token: torch.Tensor, cache: list, pos: int | torch.Tensor) -> torch.Tensor:
    """Run one token (B, 1) at position `pos` (or per-row positions (B,)) against the cache; return
    its logits (B, V)."""
    return model(token, cache=cache, start=pos).logits[:, -1]
