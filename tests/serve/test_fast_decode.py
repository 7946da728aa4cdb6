"""The compiled decode step of the server: the tokens and logprobs of eager decoding, few shapes."""

from __future__ import annotations

import pytest
import torch
from test_engine import ByteTokenizer, Collector, tiny_model

from nanoseek.generation import SamplingOptions
from nanoseek.serve.engine import Engine, Sequence
from nanoseek.serve.fast_decode import FastDecode, batch_buckets, bucket, length_buckets
from nanoseek.serve.fast_prefill import FastPrefill


def test_buckets():
    assert batch_buckets(1) == [1] and batch_buckets(16) == [1, 2, 4, 8, 16] and batch_buckets(12) == [1, 2, 4, 8, 12]
    assert length_buckets(64) == [64] and length_buckets(1024) == [256, 1024]
    assert length_buckets(4096) == [256, 1024, 4096] and length_buckets(3000) == [256, 1024, 3000]
    assert bucket(3, [1, 2, 4]) == 4 and bucket(4, [1, 2, 4]) == 4


def test_batch_sizes_must_end_at_the_cache_rows():
    model = tiny_model("gpt2-tiny")
    with pytest.raises(ValueError, match="max_batch=3"):
        FastDecode(model, model.make_cache(3, 64), 3, 64, batch_sizes=[4])


def run(model, compile: bool, batch_sizes=None, max_batch=3):
    """Six greedy requests of different lengths through `max_batch` rows (joining and leaving), one
    with logprobs: each request's tokens and recorded logprobs, and the engine."""
    g = torch.Generator().manual_seed(1)
    lengths, max_tokens = [3, 11, 6, 17, 1, 9], [12, 5, 20, 8, 15, 10]
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]
    engine = Engine(
        model, ByteTokenizer(), max_batch=max_batch, max_queue=16, compile=compile, compile_batch_sizes=batch_sizes
    )
    collectors = [Collector() for _ in prompts]
    seqs = [
        Sequence(p, n, SamplingOptions(temperature=0), c, index=i, logprobs=3 if i == 2 else None)
        for i, (p, n, c) in enumerate(zip(prompts, max_tokens, collectors))
    ]
    engine.start(wait=True)
    try:
        engine.submit(seqs)
        for c in collectors:
            assert c.done.wait(120)
    finally:
        engine.stop()
    logprobs = [e for ev in collectors[2].events for e in ev.logprobs or []]
    return [s.output_ids for s in seqs], logprobs, engine


def assert_same_decoding(model, batch_sizes, max_batch=3, logprobs=True):
    eager, eager_lp, _ = run(model, compile=False, max_batch=max_batch)
    compiled, compiled_lp, engine = run(model, compile=True, batch_sizes=batch_sizes, max_batch=max_batch)
    assert engine.fast is not None and engine.stats()["compiled"]  # compiled, not fallen back to eager
    assert compiled == eager
    assert [e.id for e in compiled_lp] == [e.id for e in eager_lp]
    if logprobs:
        assert torch.allclose(
            torch.tensor([e.logprob for e in compiled_lp]), torch.tensor([e.logprob for e in eager_lp])
        )
    return engine


def test_compiled_engine_decodes_as_the_eager_engine(monkeypatch):
    """MLA + MoE; one padded batch size: 1 and 2 running rows run as 3, the pad rows in free rows;
    the prompts prefilled alone go through the compiled prefill's windows."""
    compiled_prefills = []
    call = FastPrefill.__call__

    def counted(self, prompt, begin, row):
        logits = call(self, prompt, begin, row)
        compiled_prefills.append(logits is not None)
        return logits

    monkeypatch.setattr(FastPrefill, "__call__", counted)
    engine = assert_same_decoding(tiny_model("deepseek-v3-tiny"), batch_sizes=[3])
    assert set(engine.fast.decoders) == {(3, 64)}  # one shape: nothing compiled after the warm-up
    assert engine.stats()["compiled_prefill"] and compiled_prefills and all(compiled_prefills)


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset,overrides",
    [
        ("llama-tiny", {}),
        ("deepseek-v32-tiny", {"index_topk": 5}),
        ("llama-tiny", {"sparse": "nsa", "nsa_block": 4, "nsa_topn": 3, "sliding_window": 6}),
        ("deepseek-v4-tiny", {"index_n_heads": 8}),
    ],
)
def test_compiled_engine_decodes_as_the_eager_engine_for_every_kind(preset, overrides):
    # DSA: a random indexer's scores tie at exactly 0 (its ReLU) across the top-k cut, and topk's choice
    # among ties depends on how many keys the step reads: the tokens agree, a logprob may move a little
    dsa = preset == "deepseek-v32-tiny"
    engine = assert_same_decoding(tiny_model(preset, **overrides), batch_sizes=None, max_batch=3, logprobs=not dsa)
    assert set(engine.fast.decoders) == {(1, 64), (2, 64), (3, 64)}
    # padded prefill windows only where every cache masks keys by position (not NSA, not V4's)
    masks_by_position = preset in ("llama-tiny", "deepseek-v32-tiny") and "sparse" not in overrides
    assert (engine.fast_prefill is not None) == masks_by_position


def test_a_failed_warm_up_leaves_the_engine_decoding_eagerly(monkeypatch):
    def broken(self):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(FastDecode, "warm_up", broken)
    model = tiny_model("gpt2-tiny")
    got, _, engine = run(model, compile=True)
    assert engine.fast is None and not engine.stats()["compiled"]
    assert got == run(model, compile=False)[0]


def test_a_failing_compiled_step_leaves_each_row_to_the_eager_step(monkeypatch):
    """Isolation on the compiled path: the rows of a failed batched step are stepped alone, eagerly."""

    def broken(self, tokens, positions, last):
        raise RuntimeError("a broken graph")

    monkeypatch.setattr(FastDecode, "warm_up", lambda self: 0.0)
    monkeypatch.setattr(FastDecode, "step", broken)
    model = tiny_model("gpt2-tiny")
    got, _, engine = run(model, compile=True)
    assert engine.fast is not None and got == run(model, compile=False)[0]


def test_a_failing_compiled_prefill_leaves_the_prompt_to_the_eager_prefill(monkeypatch):
    def broken(self, prompt, begin, row):
        raise RuntimeError("a broken window")

    monkeypatch.setattr(FastDecode, "warm_up", lambda self: 0.0)
    monkeypatch.setattr(FastDecode, "step", lambda self, tokens, positions, last: 1 / 0)  # eager steps too
    monkeypatch.setattr(FastPrefill, "warm_up", lambda self: 0.0)
    monkeypatch.setattr(FastPrefill, "__call__", broken)
    model = tiny_model("gpt2-tiny")
    got, _, engine = run(model, compile=True)
    assert engine.fast_prefill is not None and got == run(model, compile=False)[0]
