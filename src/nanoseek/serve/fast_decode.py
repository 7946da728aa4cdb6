"""The server's decode step compiled: a few fixed shapes, compiled once at start-up.

The engine's decode step feeds the last token of each running row r at its own position p_r
against rows 0..n-1 of its cache (one mask per row, keys 0..p_r visible). Its shape changes with n
and with the longest row, and torch.compile builds a graph per shape, so the compiled step runs on
a few fixed shapes instead:

    batch   n rows padded up to the next batch bucket B (1, 2, 4, ... up to max_batch); a pad row
            feeds token 0 at position 0 into a free cache row (rows n.. are free: the engine keeps
            its running rows packed at 0..n-1, and a new request's prefill overwrites position 0)
    length  the cache read up to the next length bucket L >= max_r p_r + 1 (256, x4 up to the
            context; the positions past a row's own are masked, as in the eager step)

Each (B, L) pair is a `CompiledDecoder` over the engine's own cache rows 0..B-1, positions 0..L-1
(views: the step writes straight into the engine's cache), with the fast paths of `sample
--compile`: on the CPU the direct call of the compiled graph after its first, guarded step, on CUDA
a CUDA graph captured once and replayed. `warm_up` compiles every pair before the server takes
requests, so no request ever waits for a compile: |B| x |L| graphs (5 x 2 for a 16-row server on a
1024-position model), each tens of seconds on a small CPU the first time, seconds afterwards from
torch's on-disk cache. The logits equal the eager step's (tested), so greedy outputs, logprobs and
constrained decoding are those of eager decoding.
"""

from __future__ import annotations

import logging
import time

import torch

from nanoseek.generation.compiled import DECODE_CACHE_MIN, CompiledDecoder, DecodeOptions

log = logging.getLogger("nanoseek.serve")

LENGTH_GROWTH = 4  # consecutive length buckets differ by this factor: few graphs, at most 4x the keys read


def batch_buckets(max_batch: int) -> list[int]:
    """The padded batch sizes: powers of two below max_batch, then max_batch."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


def length_buckets(context: int) -> list[int]:
    """The cache lengths a step reads: DECODE_CACHE_MIN, then x LENGTH_GROWTH, the context last."""
    lengths, n = [], DECODE_CACHE_MIN
    while n < context:
        lengths.append(n)
        n *= LENGTH_GROWTH
    return lengths + [context]


def bucket(value: int, buckets: list[int]) -> int:
    return next(b for b in buckets if b >= value)


class FastDecode:
    """The engine's compiled decode step (see the module docstring): `step` takes the running rows'
    tokens and positions and returns their logits, as `generation.steps.decode_step` would."""

    def __init__(
        self,
        model,
        cache: list,
        max_batch: int,
        context: int,
        options: DecodeOptions | None = None,
        batch_sizes: list[int] | None = None,
    ):
        self.model, self.cache = model, cache
        self.options = options or DecodeOptions()
        self.batch_sizes = sorted(set(batch_sizes or batch_buckets(max_batch)))
        if self.batch_sizes[0] < 1 or self.batch_sizes[-1] != max_batch:  # the cache has max_batch rows
            raise ValueError(f"batch sizes {self.batch_sizes} must be >= 1 and end at max_batch={max_batch}")
        self.lengths = length_buckets(context)
        self.device = next(model.parameters()).device
        self.decoders: dict[tuple[int, int], CompiledDecoder] = {}
        self.checked: set[tuple[int, int]] = set()  # decoders whose guards were checked once

    def shapes(self) -> list[tuple[int, int]]:
        return [(b, n) for b in self.batch_sizes for n in self.lengths]

    def warm_up(self) -> float:
        """Compile (or load from torch's cache) every shape; seconds taken. Writes position 0 of the
        cache's rows, so only while no request holds a row (the engine calls it before serving)."""
        t0 = time.perf_counter()
        for batch, length in self.shapes():
            tokens = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
            positions = torch.zeros(batch, dtype=torch.long, device=self.device)
            self._run(batch, length, tokens, positions)
            log.info("compiled the decode step for %d rows x %d positions", batch, length)
        return time.perf_counter() - t0

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, last: int) -> torch.Tensor:
        """Logits (n, V) of `tokens` (n, 1) at per-row `positions` (n,) against cache rows 0..n-1;
        `last`: the largest position (known to the caller, so a GPU need not be asked)."""
        n = tokens.shape[0]
        batch = bucket(n, self.batch_sizes)
        length = bucket(last + 1, self.lengths)
        if batch > n:  # pad rows: token 0 at position 0 of a free row
            tokens = torch.cat([tokens, tokens.new_zeros(batch - n, 1)])
            positions = torch.cat([positions, positions.new_zeros(batch - n)])
        return self._run(batch, length, tokens, positions)[:n]

    def _run(self, batch: int, length: int, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        key = (batch, length)
        decoder = self.decoders.get(key)
        if decoder is None:
            view = [c.rows(0, batch, length) for c in self.cache]
            decoder = self.decoders[key] = CompiledDecoder(self.model, batch, length, self.options, cache=view)
        guarded = key not in self.checked  # the first call checks dynamo's guards and picks the graph
        logits = decoder(tokens, positions, guarded=guarded)
        self.checked.add(key)
        return logits
