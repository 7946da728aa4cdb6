"""Engine events to the asyncio loop: collected by `put`, handed over by `flush`, which the engine
calls before each model call and before it waits for work."""

from __future__ import annotations

import asyncio
import threading

from test_engine import ByteTokenizer, tiny_model

from nanoseek.generation import SamplingOptions
from nanoseek.serve.engine import Engine, Sequence
from nanoseek.serve.handoff import Handoff


def test_events_wait_for_a_flush_and_a_batch_costs_one_wake_up():
    """Events put from another thread reach their queues, in order, only after a flush; flushing
    again before the loop ran schedules nothing more."""

    async def main():
        loop = asyncio.get_running_loop()
        handoff = Handoff(loop)
        wakeups = []
        schedule = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda fn, *a: (wakeups.append(fn), schedule(fn, *a))[1]
        queues = [asyncio.Queue(), asyncio.Queue()]
        thread = threading.Thread(target=lambda: [handoff.put(queues[i % 2], i) for i in range(10)])
        thread.start()
        thread.join()
        await asyncio.sleep(0.01)
        unflushed = [q.qsize() for q in queues]
        handoff.flush()
        handoff.flush()  # already scheduled: no second wake-up
        got = [[await q.get() for _ in range(5)] for q in queues]
        handoff.flush()  # nothing pending: nothing scheduled
        handoff.put(queues[0], 10)
        handoff.flush()
        got[0].append(await queues[0].get())
        return unflushed, got, len(wakeups)

    unflushed, got, wakeups = asyncio.run(main())
    assert unflushed == [0, 0]
    assert got == [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9]]
    assert wakeups == 2


def test_a_flush_after_the_loop_closed_drops_the_events():
    loop = asyncio.new_event_loop()
    handoff = Handoff(loop)
    loop.close()
    handoff.put(asyncio.Queue(), 1)
    handoff.flush()  # no error: nobody is left to read them
    assert handoff.pending == [] and not handoff.scheduled


def test_the_engine_flushes_before_model_calls_and_before_it_waits():
    """Every event the engine emits is flushed before the model runs again (so a server streams it
    while the model computes) and when the engine runs out of work."""
    pending, delivered, done = [], [], threading.Event()
    unflushed_at_model_calls = []

    def flush():
        delivered.extend(pending)
        pending.clear()
        if any(e.finish_reason for e in delivered):
            done.set()

    model = tiny_model("gpt2-tiny")
    forward = model.forward

    def watched(*args, **kwargs):
        unflushed_at_model_calls.append(len(pending))
        return forward(*args, **kwargs)

    model.forward = watched
    engine = Engine(model, ByteTokenizer(), max_batch=2, flush_events=flush)
    seqs = [Sequence([1, 2, 3], 6, SamplingOptions(temperature=0), pending.append, index=i) for i in range(2)]
    engine.start()
    try:
        engine.submit(seqs[:1])
        assert done.wait(60)
        done.clear()
        delivered.clear()
        engine.submit(seqs[1:])
        assert done.wait(60)
    finally:
        engine.stop()
    assert pending == [] and len(delivered) == 6 and delivered[-1].finish_reason == "length"
    assert len(unflushed_at_model_calls) >= 12 and set(unflushed_at_model_calls) == {0}
