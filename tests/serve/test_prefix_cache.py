"""Prefix caching: prompts that share a prefix reuse its KV blocks and decode exactly as without them."""

from __future__ import annotations

import pytest
import torch
from test_engine import VOCAB, ByteTokenizer, Collector

from nanoseek import ModelConfig, Transformer
from nanoseek.generation import SamplingOptions
from nanoseek.serve.engine import Engine, Sequence
from nanoseek.serve.prefix_cache import PrefixCache, block_tokens

SYSTEM = list(range(40, 110))  # a shared "system prompt" of 70 tokens: two blocks of 32


def tiny_model(preset: str, **overrides) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset).replace(vocab_size=VOCAB, max_position_embeddings=128, **overrides)
    return Transformer(cfg).eval()


def greedy_outputs(model, prompts, max_tokens, prefix_cache_bytes, max_batch=2, echo=()):
    """Each prompt's generated ids, and the engine. `echo`: indices that ask for their prompt's logprobs."""
    engine = Engine(model, ByteTokenizer(), max_batch=max_batch, max_queue=16, prefix_cache_bytes=prefix_cache_bytes)
    collectors = [Collector() for _ in prompts]
    seqs = [
        Sequence(p, max_tokens, SamplingOptions(temperature=0), c, index=i, logprobs=0 if i in echo else None)
        for i, (p, c) in enumerate(zip(prompts, collectors))
    ]
    for i in echo:
        seqs[i].echo_logprobs = True
    engine.start(wait=True)
    try:
        engine.submit(seqs)
        for c in collectors:
            assert c.done.wait(60)
    finally:
        engine.stop()
    return [s.output_ids for s in seqs], seqs, engine


def shared_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    questions = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 12, 1, 30, 9)]
    return [SYSTEM + q for q in questions] + [SYSTEM[:33]]  # the last: the first block and one token


@pytest.mark.parametrize(
    "preset,overrides",
    [
        ("llama-tiny", {}),  # dense K/V
        ("llama-tiny", {"position": "alibi"}),  # distance biases: the rest prefilled at its true positions
        ("llama-tiny", {"position": "t5"}),
        ("deepseek-v3-tiny", {}),  # MLA's latent cache
        ("llama-tiny", {"sparse": "sliding", "sliding_window": 4}),
        ("deepseek-v32-tiny", {"index_topk": 5}),  # DSA: the indexer's keys too
        ("llama-tiny", {"sparse": "nsa", "nsa_block": 4, "nsa_topn": 3, "sliding_window": 6}),  # block summaries
        ("deepseek-v4-tiny", {"index_n_heads": 8}),  # CSA/HCA: raw projections and pooled windows
    ],
)
def test_outputs_identical_with_and_without_the_prefix_cache(preset, overrides):
    model = tiny_model(preset, **overrides)
    prompts = shared_prompts()
    without, _, _ = greedy_outputs(model, prompts, 8, prefix_cache_bytes=0)
    with_cache, seqs, engine = greedy_outputs(model, prompts, 8, prefix_cache_bytes=1 << 24)
    assert with_cache == without
    stats = engine.prefix.stats
    # 70 shared tokens: two whole blocks; the first two prompts arrive together and, where the
    # caches allow padding, are prefilled in one batch (so the second finds nothing cached yet)
    second = 0 if engine.pads_prefills else 64
    assert [s.cached_tokens for s in seqs] == [0, second, 64, 64, 64, 32]
    assert stats.hits == 4 + bool(second) and stats.hit_tokens == second + 3 * 64 + 32
    assert engine.prefix.block == block_tokens(model)


def test_prompt_logprobs_bypass_the_lookup_but_fill_the_cache():
    model = tiny_model("deepseek-v3-tiny")
    prompts = [SYSTEM + [1, 2], SYSTEM + [3]]
    plain, _, _ = greedy_outputs(model, prompts, 6, prefix_cache_bytes=0, max_batch=1)
    got, seqs, engine = greedy_outputs(model, prompts, 6, prefix_cache_bytes=1 << 24, max_batch=1, echo=(0,))
    assert got == plain
    assert seqs[0].cached_tokens == 0  # every prompt position computed, for its logprobs
    assert seqs[1].cached_tokens == 64  # ...and stored for the next prompt


# ---------------------------------------------------------------------------- the store itself


def filled_row(model, prompt):
    cache = model.make_cache(1, 128)
    with torch.inference_mode():
        model(torch.tensor([prompt]), cache=cache, start=0)
    return cache


def test_lru_eviction_respects_the_bound_and_keeps_chains_whole():
    model = tiny_model("llama-tiny")
    probe = PrefixCache(model, max_bytes=1 << 30)
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(0, 256, (97,), generator=g).tolist() for _ in range(3))
    probe.store(a, filled_row(model, a), [])
    per_block = probe.bytes // 3  # 97 tokens: three whole blocks
    cache = PrefixCache(model, max_bytes=5 * per_block)  # room for five blocks
    for prompt in (a, b):
        cache.store(prompt, filled_row(model, prompt), cache.match(prompt))
    # a, then b: b's third block evicted a's last, the least recently used block
    assert len(cache.blocks) == 5 and cache.bytes <= cache.max_bytes and cache.stats.evictions == 1
    assert len(cache.match(a)) == 2 and len(cache.match(b)) == 3  # b touched last
    cache.store(c, filled_row(model, c), cache.match(c))  # a's chain goes (from its end), then b's end
    assert cache.bytes <= cache.max_bytes and cache.stats.evictions == 4
    assert len(cache.match(c)) == 3 and len(cache.match(a)) == 0 and len(cache.match(b)) == 2
    for block in cache.blocks.values():  # no block outlives its parent
        assert block.parent is None or block.parent in cache.blocks


def test_a_block_larger_than_the_bound_is_not_stored():
    model = tiny_model("llama-tiny")
    cache = PrefixCache(model, max_bytes=16)
    prompt = list(range(70))
    cache.store(prompt, filled_row(model, prompt), [])
    assert cache.bytes == 0 and not cache.blocks and cache.match(prompt) == []


def test_restored_entries_equal_a_whole_prefill():
    model = tiny_model("deepseek-v3-tiny")
    cache = PrefixCache(model, max_bytes=1 << 24)
    prompt = list(range(3, 80))
    cache.store(prompt, filled_row(model, prompt), [])
    row = model.make_cache(1, 128)
    start = cache.restore(cache.match(prompt + [5]), row)
    assert start == 64
    whole = filled_row(model, prompt)
    assert torch.equal(row[0].key[:, :start], whole[0].key[:, :start])


def test_block_size_covers_the_sparse_kinds_windows():
    assert block_tokens(tiny_model("llama-tiny", sparse="nsa", nsa_block=24, nsa_topn=3, sliding_window=6)) == 96
    assert block_tokens(tiny_model("deepseek-v4-tiny")) == 32  # compression rates 4 and 8
