"""Engine events to the asyncio loop: one wake-up of the loop per batch of events, not per event.

The engine thread emits every row's event of a decode step in one stretch of Python. Each
`call_soon_threadsafe` writes the loop's wake-up socket, a system call that lets go of the GIL, so
waking the loop per event would let the loop thread take the GIL from the engine once per row. Here
the first event of a batch schedules one `deliver`, the later ones join its list, and `deliver`
puts them all into their requests' queues.

(Holding the wake-up back until the engine's next model call, so that the loop would stream while
the compiled step runs without the GIL, measured no faster at 16 streams on the 2-core test CPU
and delayed first tokens by ~12 ms at the median: the loop took the GIL at that wake-up's system
call, before the step began, just the same.)

`make_emitter` (in a request handler, on the loop) gives a request its queue and the `emit`
callback the engine calls.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from functools import partial


class Handoff:
    """The events put for one loop since its last delivery (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop_ref = weakref.ref(loop)  # HANDOFFS is keyed by the loop: no strong reference back
        self.lock = threading.Lock()
        self.pending: list[tuple[asyncio.Queue, object]] = []
        self.scheduled = False

    def put(self, queue: asyncio.Queue, event) -> None:
        with self.lock:
            self.pending.append((queue, event))
            if self.scheduled:
                return
            self.scheduled = True
        loop = self.loop_ref()
        try:
            if loop is None:
                raise RuntimeError("the loop is gone")
            loop.call_soon_threadsafe(self.deliver)
        except RuntimeError:  # the loop has closed: nobody is left to read the events
            with self.lock:
                self.pending, self.scheduled = [], False

    def deliver(self) -> None:
        with self.lock:
            batch, self.pending, self.scheduled = self.pending, [], False
        for q, event in batch:
            q.put_nowait(event)


HANDOFFS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loop -> its Handoff


def make_emitter() -> tuple[asyncio.Queue, partial]:
    """(a request's event queue, the `emit` callback that feeds it through its loop's Handoff)."""
    loop = asyncio.get_running_loop()
    handoff = HANDOFFS.get(loop)
    if handoff is None:
        handoff = HANDOFFS[loop] = Handoff(loop)
    events: asyncio.Queue = asyncio.Queue()
    return events, partial(handoff.put, events)
