"""Engine events to the asyncio loop: one wake-up of the loop per batch of events."""

from __future__ import annotations

import asyncio
import threading

from nanoseek.serve.handoff import Handoff


def test_a_batch_of_events_costs_one_wake_up():
    """Events put from another thread reach their queues in order; a batch put while the loop is
    busy costs one call_soon_threadsafe."""

    async def main():
        loop = asyncio.get_running_loop()
        handoff = Handoff(loop)
        wakeups = []
        schedule = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda fn, *a: (wakeups.append(fn), schedule(fn, *a))[1]
        queues = [asyncio.Queue(), asyncio.Queue()]
        thread = threading.Thread(target=lambda: [handoff.put(queues[i % 2], i) for i in range(10)])
        thread.start()
        thread.join()  # the loop has not run since: one batch
        got = [[await q.get() for _ in range(5)] for q in queues]
        handoff.put(queues[0], 10)
        got[0].append(await queues[0].get())
        return got, len(wakeups)

    got, wakeups = asyncio.run(main())
    assert got == [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9]]
    assert wakeups == 2


def test_events_put_after_the_loop_closed_are_dropped():
    loop = asyncio.new_event_loop()
    handoff = Handoff(loop)
    loop.close()
    handoff.put(asyncio.Queue(), 1)  # no error: nobody is left to read them
    assert handoff.pending == [] and not handoff.scheduled
