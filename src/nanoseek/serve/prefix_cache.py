"""Prefix caching: the KV cache of earlier prompts reused by a new prompt that starts the same way.

A causal model's cache entries at positions 0..m-1 depend only on tokens 0..m-1, so a prompt that
shares its first m tokens with an earlier one can copy those entries instead of recomputing them,
and prefill only the rest (at positions m..P-1):

    blocks    a prompt's first tokens in blocks of `block` tokens; block i is keyed by
              key_i = H(key_{i-1}, tokens of block i), a hash chain, so equal keys mean equal
              prefixes (the block's tokens are compared too: a hash collision cannot mix prompts)
    lookup    the longest chain of cached blocks that leaves at least one prompt token to prefill
              (its logits give the first new token); their entries are copied into the request's
              cache row, and the prefill starts at m = (number of blocks) x block
    store     after the prefill, the prompt's full blocks not yet cached are copied out of the row
    bound     the blocks' bytes stay under `max_bytes`: the least recently used block with no cached
              child is evicted first (a block is touched whenever a lookup passes through it, leaf
              first, so a chain is always evicted from its end and no cached block is unreachable)

What a block holds, per layer, is the slice of each cache buffer that its positions wrote:

    dense (MHA/GQA, sliding window)  K and V, positions [a, b)
    MLA                              [c_KV ; k_R] (and DSA's indexer keys k^I), positions [a, b)
    NSA                              each branch's K and V, positions [a, b), and the compressed
                                     block summaries k^cmp, v^cmp of blocks [a / l, b / l)
    DeepSeek-V4 (CSA/HCA)            the shared K=V and the compressors' raw projections, positions
                                     [a, b), and the pooled entries of windows [a / m, b / m)

so every attention kind nanoseek has is included; the block size is raised to a multiple of the
NSA block l and of the V4 compression rates m, so a cached block never holds half a window. A cache
of another kind (none today) is refused: that model serves without a prefix cache. Prefilling the
rest at m gives the logits of a whole prefill up to float rounding (~1e-7 in fp32; tested, with
greedy outputs identical with and without the cache).
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

from nanoseek.model.attention.nsa import NSACache
from nanoseek.model.kv_cache import CompressedKVCache, DenseKVCache, LatentKVCache

BLOCK_TOKENS = 32  # tokens per cached block (raised to a multiple of a sparse kind's windows)


def buffer_layout(attn, cache) -> list[tuple[torch.Tensor, int, int]] | None:
    """(buffer, time dim, positions per entry) of each buffer of one layer's cache `cache` (of
    attention module `attn`); None for a cache kind the prefix cache does not know."""
    if isinstance(cache, DenseKVCache):
        return [(cache.k, 2, 1), (cache.v, 2, 1)]
    if isinstance(cache, LatentKVCache):
        return [(cache.key, 1, 1)] + ([] if cache.index_keys is None else [(cache.index_keys, 1, 1)])
    if isinstance(cache, CompressedKVCache):
        rate = attn.compressor.rate if attn.compressor is not None else 1
        return [(b, 1, rate if name.endswith("entries") else 1) for name, b in cache.buffers.items()]
    if isinstance(cache, NSACache):
        dense = [entry for c in cache.caches for entry in buffer_layout(attn, c)]
        return dense + [(x, 2, cache.block) for x in cache.blocks]
    return None


def refusal(model) -> str | None:
    """Why `model`'s caches cannot be prefix-cached, or None when they can."""
    cache = model.make_cache(1, 1, device="meta")
    for layer, c in zip(model.layers, cache):
        if buffer_layout(layer.self_attn, c) is None:
            return f"its {type(c).__name__} cache has no known layout"
    return None


def block_tokens(model, base: int = BLOCK_TOKENS) -> int:
    """`base`, raised to a multiple of every per-window step of the model's caches."""
    steps = {
        step
        for layer, c in zip(model.layers, model.make_cache(1, 1, device="meta"))
        for _, _, step in buffer_layout(layer.self_attn, c)
    }
    return math.lcm(base, *steps)


@dataclass(eq=False)
class Block:
    key: bytes
    parent: bytes | None
    tokens: tuple[int, ...]
    parts: list[torch.Tensor]  # one slice per buffer of every layer, in `buffer_layout` order
    children: int = 0

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parts)


@dataclass
class PrefixStats:
    lookups: int = 0  # prompts looked up
    hits: int = 0  # prompts that reused at least one block
    queried_tokens: int = 0  # prompt tokens looked up
    hit_tokens: int = 0  # prompt tokens whose entries came from the cache
    evictions: int = 0  # blocks evicted
    stored: int = 0  # blocks stored


class PrefixCache:
    """Cached KV blocks of earlier prompts (see the module docstring); used on the engine thread."""

    def __init__(self, model, max_bytes: int, block: int | None = None):
        reason = refusal(model)
        if reason is not None:
            raise ValueError(f"prefix caching is not available for this model: {reason}")
        if max_bytes <= 0:
            raise ValueError(f"max_bytes={max_bytes} must be > 0")
        self.model, self.max_bytes = model, max_bytes
        self.block = block_tokens(model, block or BLOCK_TOKENS)
        self.blocks: OrderedDict[bytes, Block] = OrderedDict()  # least recently used first
        self.bytes = 0
        self.stats = PrefixStats()

    # ------------------------------------------------------------------ the engine's side
    def match(self, prompt: list[int]) -> list[Block]:
        """The longest cached chain of `prompt`'s blocks that leaves at least one token to prefill;
        counted in the statistics, touched in the LRU order."""
        chain = self.lookup(prompt)
        self.record(prompt, chain)
        return chain

    def lookup(self, prompt: list[int]) -> list[Block]:
        """`match` without its side effects (statistics, LRU order)."""
        chain, parent = [], None
        for i in range((len(prompt) - 1) // self.block):
            tokens = tuple(prompt[i * self.block : (i + 1) * self.block])
            block = self.blocks.get(self.key(parent, tokens))
            if block is None or block.tokens != tokens:
                break
            chain.append(block)
            parent = block.key
        return chain

    def record(self, prompt: list[int], chain: list[Block]) -> None:
        """Count a lookup of `prompt` that found `chain` and touch its blocks."""
        self.touch(chain)
        self.stats.lookups += 1
        self.stats.hits += bool(chain)
        self.stats.queried_tokens += len(prompt)
        self.stats.hit_tokens += len(chain) * self.block

    def restore(self, chain: list[Block], row: list) -> int:
        """Copy `chain`'s entries into `row` (one request's cache: each layer's `rows(r, r + 1)`);
        return the number of positions restored."""
        if not chain:
            return 0
        for j, (buffer, dim, _) in enumerate(self.layout(row)):
            parts = [b.parts[j] for b in chain]
            data = parts[0] if len(parts) == 1 else torch.cat(parts, dim)
            buffer.narrow(dim, 0, data.shape[dim]).copy_(data)
        return len(chain) * self.block

    def store(self, prompt: list[int], row: list, chain: list[Block]) -> None:
        """Cache `prompt`'s full blocks after `chain` (its cached prefix), copied out of `row`, which
        holds the prompt's entries; stops when the bound leaves no room. A chain looked up a while
        ago may have lost its end to eviction since (requests prefilled together store in turn):
        then nothing is stored, as there is no parent to hang new blocks on."""
        if chain and chain[-1].key not in self.blocks:
            return
        layout = self.layout(row)
        parent = chain[-1].key if chain else None
        new = []
        for i in range(len(chain), len(prompt) // self.block):
            a, b = i * self.block, (i + 1) * self.block
            tokens = tuple(prompt[a:b])
            key = self.key(parent, tokens)
            block = self.blocks.get(key)
            if block is None:
                parts = [buf.narrow(dim, a // step, (b - a) // step).clone() for buf, dim, step in layout]
                block = Block(key, parent, tokens, parts)
                if not self.make_room(block.nbytes, pinned=set(new) | {parent}):
                    break
                self.add(block)
            new.append(key)
            parent = key
        self.touch(chain + [self.blocks[k] for k in new])

    # ------------------------------------------------------------------ inside
    @staticmethod
    def key(parent: bytes | None, tokens: tuple[int, ...]) -> bytes:
        h = hashlib.blake2b(parent or b"", digest_size=16)
        h.update(array("q", tokens).tobytes())
        return h.digest()

    def layout(self, row: list) -> list[tuple[torch.Tensor, int, int]]:
        return [entry for layer, c in zip(self.model.layers, row) for entry in buffer_layout(layer.self_attn, c)]

    def touch(self, chain: list[Block]) -> None:
        """Most recently used: the chain's blocks, leaf first, so a parent stays after its children."""
        for block in reversed(chain):
            self.blocks.move_to_end(block.key)

    def add(self, block: Block) -> None:
        self.blocks[block.key] = block
        self.bytes += block.nbytes
        self.stats.stored += 1
        if block.parent is not None:
            self.blocks[block.parent].children += 1

    def make_room(self, nbytes: int, pinned: set) -> bool:
        """Evict least recently used leaves (not `pinned`) until `nbytes` more fit; False if they cannot."""
        if nbytes > self.max_bytes:
            return False
        while self.bytes + nbytes > self.max_bytes:
            victim = next((b for k, b in self.blocks.items() if not b.children and k not in pinned), None)
            if victim is None:
                return False
            self.evict(victim)
        return True

    def evict(self, block: Block) -> None:
        del self.blocks[block.key]
        self.bytes -= block.nbytes
        self.stats.evictions += 1
        if block.parent is not None:
            self.blocks[block.parent].children -= 1

    def hit_rate(self) -> float:
        """Prompt tokens served from the cache / prompt tokens looked up (0 before any lookup)."""
        return self.stats.hit_tokens / self.stats.queried_tokens if self.stats.queried_tokens else 0.0

    def summary(self) -> dict:
        s = self.stats
        return {
            "prefix_cache_blocks": len(self.blocks),
            "prefix_cache_bytes": self.bytes,
            "prefix_cache_max_bytes": self.max_bytes,
            "prefix_cache_block_tokens": self.block,
            "prefix_cache_hit_rate": round(self.hit_rate(), 4),
            "prefix_cache_hit_tokens": s.hit_tokens,
            "prefix_cache_queried_tokens": s.queried_tokens,
            "prefix_cache_lookups": s.lookups,
            "prefix_cache_hits": s.hits,
            "prefix_cache_evictions": s.evictions,
        }
