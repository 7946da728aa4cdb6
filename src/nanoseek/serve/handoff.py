"""Engine events to the asyncio loop, handed over when the engine is about to run the model.

The engine thread emits every row's event of a decode step in one stretch of Python, and the loop
thread turns each into an HTTP chunk, in Python too: the two share the GIL, so the time the loop
spends streaming is time the engine cannot sample, emit or start its next step, except while the
engine is inside a model call (the compiled step runs without the GIL). Hence:

    put     an event joins its loop's list; nothing wakes the loop yet (waking it at the first
            event of a step let it take the GIL at the engine's next torch call and stream while
            the engine sampled and emitted the rest: the two took turns)
    flush   the engine calls it right before each model call and before it waits for work: one
            `call_soon_threadsafe` per loop schedules `deliver`, which puts the collected events
            into their requests' queues, so the loop streams while the model computes

(Waking the loop from a helper thread instead, so that the engine's wake-up system call could not
hand the GIL to the loop before the step started, measured worse: a third thread in the GIL's
rotation.) `make_emitter` (in a request handler, on the loop) gives a request its queue and the
`emit` callback the engine calls; `flush_events` is the engine's `flush_events` hook.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from functools import partial


class Handoff:
    """The events collected for one loop since its last delivery (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[tuple[asyncio.Queue, object]] = []
        self.scheduled = False

    def put(self, queue: asyncio.Queue, event) -> None:
        with self.lock:
            self.pending.append((queue, event))

    def flush(self) -> None:
        with self.lock:
            if not self.pending or self.scheduled:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self.deliver)
        except RuntimeError:  # the loop has closed: nobody is left to read the events
            with self.lock:
                self.pending, self.scheduled = [], False

    def deliver(self) -> None:
        with self.lock:
            batch, self.pending, self.scheduled = self.pending, [], False
        for q, event in batch:
            q.put_nowait(event)


HANDOFFS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loop -> its Handoff
HANDOFFS_LOCK = threading.Lock()  # the loop thread adds handoffs while the engine thread flushes them


def make_emitter() -> tuple[asyncio.Queue, partial]:
    """(a request's event queue, the `emit` callback that feeds it through its loop's Handoff)."""
    loop = asyncio.get_running_loop()
    with HANDOFFS_LOCK:
        handoff = HANDOFFS.get(loop)
        if handoff is None:
            handoff = HANDOFFS[loop] = Handoff(loop)
    events: asyncio.Queue = asyncio.Queue()
    return events, partial(handoff.put, events)


def flush_events() -> None:
    """Have every loop woken for its collected engine events (`Handoff.flush`); called by the engine."""
    with HANDOFFS_LOCK:
        handoffs = list(HANDOFFS.values())
    for handoff in handoffs:
        handoff.flush()
