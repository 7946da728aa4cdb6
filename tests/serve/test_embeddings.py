"""Embeddings take turns with generation: a big request runs in chunks with decode steps between
them, and holds a place of the admission limit while it runs."""

from __future__ import annotations

import asyncio

import pytest
import torch
from test_engine import VOCAB, ByteTokenizer, Collector

from nanoseek import ModelConfig, Transformer
from nanoseek.generation import SamplingOptions
from nanoseek.serve.embeddings import CHUNK_TOKENS, MAX_INPUTS, check_inputs, chunks, embed_in_turns
from nanoseek.serve.engine import Engine, QueueFull, Sequence
from nanoseek.serve.protocol import APIError

GREEDY = SamplingOptions(temperature=0)


def test_chunks_cut_inputs_into_runs_of_about_the_budget():
    inputs = [[1] * n for n in (100, 100, 100, 300, 5, 5)]
    assert [[len(x) for x in c] for c in chunks(inputs, 256)] == [[100, 100], [100], [300], [5, 5]]


def test_a_big_embeddings_request_takes_turns_with_decode_steps():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("gpt2-tiny").replace(vocab_size=VOCAB, max_position_embeddings=1024)
    engine = Engine(Transformer(cfg).eval(), ByteTokenizer(), max_batch=2, max_queue=2)
    log: list = []
    decode = engine._decode
    engine._decode = lambda: (log.append("decode"), decode())

    def embed(model, chunk):  # runs on the engine thread, as the decode steps do
        log.append(sum(len(ids) for ids in chunk))
        return [len(ids) for ids in chunk]

    stream = Collector()
    engine.start()
    try:
        engine.submit([Sequence([1, 2], 1000, GREEDY, stream)])  # a long stream, cancelled at the end
        inputs = [[7] * 50 for _ in range(60)]  # 3000 tokens
        assert asyncio.run(embed_in_turns(engine, embed, inputs)) == [50] * 60
        assert not stream.done.is_set()  # the stream ran all along
        engine.cancel(list(engine.running))
    finally:
        engine.stop()
    jobs = [i for i, entry in enumerate(log) if entry != "decode"]
    assert len(jobs) == 12 and all(log[i] <= CHUNK_TOKENS for i in jobs)
    assert all("decode" in log[a + 1 : b] for a, b in zip(jobs, jobs[1:]))  # a decode step between chunks
    assert engine.stats()["embedding"] == 0


def test_embeddings_requests_count_against_the_queue_limit():
    engine = Engine(Transformer(ModelConfig.from_preset("gpt2-tiny")), ByteTokenizer(), max_batch=1, max_queue=1)
    engine.submit([Sequence([1], 5, GREEDY, Collector())])  # not started: it waits
    engine.reserve()  # an embeddings request holds the second place
    with pytest.raises(QueueFull, match="embedding"):
        engine.submit([Sequence([2], 5, GREEDY, Collector())])
    with pytest.raises(APIError) as info:
        asyncio.run(embed_in_turns(engine, lambda model, chunk: chunk, [[1]]))
    assert info.value.status == 429 and engine.stats()["embedding"] == 1
    engine.unreserve()
    engine.submit([Sequence([2], 5, GREEDY, Collector())])


def test_too_many_inputs_are_refused():
    with pytest.raises(APIError, match=f"at most {MAX_INPUTS}"):
        check_inputs([[1]] * (MAX_INPUTS + 1))
