"""The server's prefill compiled: a short prompt in windows of one fixed size, a graph per window.

An eager prefill of a short prompt on a small model is mostly per-operation overhead (deepseek-v3-mini,
45 tokens: 10.6 ms eagerly on one Zen-1 core, 6.8 ms through a compiled window of 64, copies
included). A graph with
dynamic shapes compiles again for new lengths and batch sizes, and one with a symbolic start
position specializes on it inside inductor; here every graph is static:

    window   C tokens (`PREFILL_WINDOW`, at most half the context) at positions s..s+C-1 of a
             one-row staging cache, for the fixed starts s = 0, C, 2C, ... (`PREFILL_WINDOWS` of
             them; one clamped to context - C where the context is no multiple of C): prompts up
             to that many positions run compiled, longer ones eagerly (their prefill is large
             enough for the eager overhead not to matter)
    prompt   positions a..P-1 (a: what the prefix cache restored into the row) go through the
             windows that hold any of them; the last is right-padded with token 0, and the first
             computes again the restored positions it holds (from the same tokens)
    logits   of position P - 1 only: the final norm and head run on that row

The staging row gets the engine row's positions 0..a-1 before the first window, and its positions
a..P-1 are copied back after the last, so the padding never reaches the engine's cache. Only where
every cache masks keys by position (dense, latent), as for the engine's padded batches: a cache
that summarizes blocks (NSA, compressed) would fold the padding in.

`warm_up` compiles every window's graph before the first request. Afterwards a call that would
compile again (a guard the warm-up did not meet) raises inside torch's "fail_on_recompile" stance
and `__call__` returns None: the caller prefills eagerly, and no request waits for a compile. That
turns the compiled prefill off for good (`ready` False: one warning, not one per request). The
logits and cache entries equal the eager prefill's up to float rounding (tested; the first window
computes again the restored positions it holds, so later positions attend to those recomputed
keys).
"""

from __future__ import annotations

import logging
import time

import torch

from nanoseek.generation.compiled import shared_function_recompile_limit
from nanoseek.model.kv_cache import DenseKVCache, LatentKVCache
from nanoseek.serve.prefix_cache import buffer_layout

log = logging.getLogger("nanoseek.serve")

# tokens per compiled call: the prefix cache's block (prefix_cache.BLOCK_TOKENS), so a prompt whose first
# blocks were restored starts a window where they end and no window computes restored positions again
# (deepseek-v3-mini, graph alone: 6.1 ms for 64 tokens, 4.2 for 32, 2.7 for 16)
PREFILL_WINDOW = 32
PREFILL_WINDOWS = 8  # compiled windows: prompts up to 8 x 32 positions


def supports_padding(cache: list) -> bool:
    """Whether windows with right padding are exact for these caches (every key masked by position)."""
    return all(type(c) in (DenseKVCache, LatentKVCache) for c in cache)


def window_starts(size: int, count: int, context: int) -> list[int]:
    """The compiled windows' starts: 0, size, 2 size, ... (`count` of them), none past the context.

    >>> window_starts(64, 4, 128), window_starts(64, 4, 1024), window_starts(50, 4, 100), window_starts(48, 4, 100)
    ([0, 64], [0, 64, 128, 192], [0, 50], [0, 48, 52])
    """
    return sorted({min(k * size, context - size) for k in range(count)})


def copy_positions(model, src: list, dst: list, a: int, b: int) -> None:
    """Positions a..b-1 of every layer's cache `src` into `dst` (one row each), buffer by buffer as
    the prefix cache lays them out."""
    for layer, s, d in zip(model.layers, src, dst):
        for (x, dim, _), (y, _, _) in zip(buffer_layout(layer.self_attn, s), buffer_layout(layer.self_attn, d)):
            y.narrow(dim, a, b - a).copy_(x.narrow(dim, a, b - a))


class FastPrefill:
    """The engine's compiled prefill (see the module docstring): `__call__` fills one engine row
    with a prompt and returns its last logits (1, V), as `generation.steps.prefill` would."""

    def __init__(self, model, context: int, window: int = PREFILL_WINDOW, windows: int = PREFILL_WINDOWS):
        self.model, self.context = model, context
        self.window = max(1, min(window, context // 2))
        self.starts = window_starts(self.window, windows, context)
        self.limit = self.starts[-1] + self.window  # prompts up to this many positions run compiled
        self.device = next(model.parameters()).device
        self.stage = model.make_cache(1, context)
        # the C++ wrapper as for the compiled decode step: on the CPU only
        options = {"cpp_wrapper": True} if self.device.type == "cpu" else {}
        self.compiled = torch.compile(self._window, dynamic=False, options=options)
        self.ready = False

    def _window(self, ids_1C: torch.Tensor, last_1: torch.Tensor, start: int) -> torch.Tensor:
        hidden = self.model(ids_1C, cache=self.stage, start=start, last_only=True).hidden
        return self.model.lm_head(self.model.norm(hidden.index_select(1, last_1)))[:, 0]

    def warm_up(self) -> float:
        """Compile the graph of every window; seconds taken."""
        t0 = time.perf_counter()
        ids = torch.zeros(1, self.window, dtype=torch.long, device=self.device)
        last = torch.zeros(1, dtype=torch.long, device=self.device)
        with shared_function_recompile_limit():
            for start in self.starts:
                self.compiled(ids, last, start)
        self.ready = True
        log.info("compiled the prefill: %d windows of %d tokens", len(self.starts), self.window)
        return time.perf_counter() - t0

    def __call__(self, prompt: list[int], begin: int, row: list) -> torch.Tensor | None:
        """Positions begin..len(prompt)-1 of `prompt` into `row` (one engine row's caches, holding
        positions 0..begin-1 already); the logits (1, V) of its last token, or None when the prompt
        is longer than the windows reach or a window would need a graph the warm-up did not
        compile (then nothing was written to `row`)."""
        end = len(prompt)
        if not self.ready or not begin < end <= self.limit:
            return None
        copy_positions(self.model, row, self.stage, 0, begin)
        padded = prompt + [0] * self.window
        logits = None
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                for start in (s for s in self.starts if begin < s + self.window and s < end):
                    ids = torch.tensor([padded[start : start + self.window]], device=self.device)
                    last = torch.tensor([min(end - 1 - start, self.window - 1)], device=self.device)
                    logits = self.compiled(ids, last, start)
        except RuntimeError as error:
            if "recompile" not in str(error):
                raise
            log.warning("the compiled prefill would compile again (%s); prefilling eagerly from now on", error)
            self.ready = False
            return None
        copy_positions(self.model, self.stage, row, begin, end)
        return logits
