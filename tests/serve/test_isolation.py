"""Isolation in the engine: a request that fails while it is prefilled, decoded, sampled or emitted
ends alone with an error event; the rows beside it finish with the text they would have alone."""

from __future__ import annotations

import pytest
from test_engine import ByteTokenizer, Collector, tiny_model

from nanoseek.generation import SamplingOptions, generate
from nanoseek.serve import engine as engine_module
from nanoseek.serve.engine import Engine, Sequence

GREEDY = SamplingOptions(temperature=0)
HEALTHY = [([3, 1, 4], 12), ([15, 9], 10), ([2, 6, 5, 3, 5], 8)]  # positions stay below 30


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama-tiny")


@pytest.fixture(scope="module")
def alone(model):
    return [generate(model, p, max_new_tokens=n, temperature=0).tolist() for p, n in HEALTHY]


def run_beside_healthy(model, poisoned: Sequence) -> tuple[list[list[int]], Collector, Engine]:
    """Three healthy greedy requests and `poisoned`, all in one batch of four rows; the healthy ids."""
    engine = Engine(model, ByteTokenizer(), max_batch=4, max_queue=4)
    ids: dict[int, list[int]] = {i: [] for i in range(len(HEALTHY))}
    accept = engine._accept

    def recording_accept(seq, token):
        if seq is not poisoned:
            ids[seq.index].append(token)
        return accept(seq, token)

    engine._accept = recording_accept
    collectors = [Collector() for _ in HEALTHY]
    healthy = [Sequence(p, n, GREEDY, c, index=i) for i, ((p, n), c) in enumerate(zip(HEALTHY, collectors))]
    engine.start()
    try:
        engine.submit([healthy[0], poisoned, *healthy[1:]])
        for c in [*collectors, poisoned.emit]:
            assert c.done.wait(30)
    finally:
        engine.stop()
    for c in collectors:
        assert c.events[-1].finish_reason == "length" and not any(e.error for e in c.events)
    return [ids[i] for i in range(len(HEALTHY))], poisoned.emit, engine


def assert_failed_alone(got, alone, poisoned: Collector, engine: Engine):
    assert got == alone
    assert poisoned.events[-1].error and poisoned.events[-1].finish_reason is None
    assert engine.stats()["running"] == 0


def test_a_row_whose_sampling_raises_ends_alone(model, alone, monkeypatch):
    make = SamplingOptions.make_generator

    def poisoned_generator(self, device):
        return object() if self.seed == 666 else make(self, device)  # not a generator: its draws raise

    monkeypatch.setattr(SamplingOptions, "make_generator", poisoned_generator)
    poisoned = Sequence([7, 7], 10, SamplingOptions(temperature=1.0, seed=666), Collector(), index=9)
    got, collector, engine = run_beside_healthy(model, poisoned)
    assert_failed_alone(got, alone, collector, engine)


def test_a_row_whose_decode_raises_ends_alone(model, alone, monkeypatch):
    """The batched forward fails once the poisoned row reaches position 45; each row is then stepped
    alone, and only the poisoned one fails."""
    step = engine_module.decode_step

    def poisoned_step(model, token, cache, pos):
        if (pos >= 45).any():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return step(model, token, cache, pos)

    monkeypatch.setattr(engine_module, "decode_step", poisoned_step)
    poisoned = Sequence(list(range(40)), 20, GREEDY, Collector(), index=9)
    got, collector, engine = run_beside_healthy(model, poisoned)
    assert_failed_alone(got, alone, collector, engine)
    assert collector.events[-2].completion_tokens == 6  # the prefill's token, then positions 40..44


def test_a_row_whose_prefill_raises_ends_alone(model, alone, monkeypatch):
    fill, fill_rows = engine_module.prefill, engine_module.prefill_rows

    def poisoned_prefill(model, ids, cache, start=0):
        if 299 in ids:
            raise MemoryError("out of memory")
        return fill(model, ids, cache, start)

    def poisoned_prefill_rows(model, prompts, cache, start=0):  # the batched prefill of the four prompts
        if any(299 in p for p in prompts):
            raise MemoryError("out of memory")
        return fill_rows(model, prompts, cache, start)

    monkeypatch.setattr(engine_module, "prefill", poisoned_prefill)
    monkeypatch.setattr(engine_module, "prefill_rows", poisoned_prefill_rows)
    poisoned = Sequence([299, 1], 10, GREEDY, Collector(), index=9)
    got, collector, engine = run_beside_healthy(model, poisoned)
    assert_failed_alone(got, alone, collector, engine)
    assert len(collector.events) == 1


class GoneClient(Collector):
    """A client whose event loop has closed: every emit raises."""

    def __call__(self, event):
        super().__call__(event)
        raise RuntimeError("Event loop is closed")


def test_a_row_whose_client_is_gone_ends_alone(model, alone):
    poisoned = Sequence([1, 2], 10, GREEDY, GoneClient(), index=9)
    got, collector, engine = run_beside_healthy(model, poisoned)
    assert got == alone and engine.stats()["running"] == 0


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324])
def test_a_tiny_temperature_row_is_greedy_beside_healthy_rows(model, alone, temperature):
    prompt = [8, 8, 1]
    tiny = Sequence(prompt, 6, SamplingOptions(temperature=temperature, seed=1), Collector(), index=9)
    got, collector, _ = run_beside_healthy(model, tiny)
    assert got == alone
    assert collector.events[-1].finish_reason == "length" and collector.events[-1].completion_tokens == 6
    text = "".join(e.text for e in collector.events)
    greedy = generate(model, prompt, max_new_tokens=6, temperature=0).tolist()
    assert text == ByteTokenizer().decode_bytes(greedy).decode()


def test_rows_keep_going_after_a_failure(model, monkeypatch):
    """The engine thread survives: a request submitted after a failed one completes."""
    make = SamplingOptions.make_generator
    monkeypatch.setattr(SamplingOptions, "make_generator", lambda self, d: object() if self.seed else make(self, d))
    engine = Engine(model, ByteTokenizer(), max_batch=2, max_queue=2).start()
    try:
        bad, good = Collector(), Collector()
        engine.submit([Sequence([1], 5, SamplingOptions(temperature=1.0, seed=3), bad)])
        assert bad.done.wait(30) and bad.events[-1].error
        engine.submit([Sequence([1], 5, GREEDY, good)])
        assert good.done.wait(30) and good.events[-1].completion_tokens == 5
    finally:
        engine.stop()
