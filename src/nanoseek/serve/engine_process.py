"""The engine in a process of its own, so that it never waits for the HTTP loop's GIL.

In one process the engine thread and the asyncio loop take turns at one GIL: every streamed token
costs the loop Python work (its event, its JSON, its write), and while the loop holds the GIL, or is
descheduled holding it, the engine cannot start its next step. `EngineProcess` runs the `Engine` in
a spawned child process (the model's tensors are shared with it, not copied) and stands in for it
in the app, with the same methods the app calls:

    parent (HTTP loop)                          child (engine process)
    submit(seqs)   --("submit", specs)-->       Sequences rebuilt, grammar compiled, Engine.submit
    cancel(seqs)   --("cancel", ids)-->         Engine.cancel
    call_with_model(fn, *args) --("call")-->    fn(model, *args) between two steps
                   <--("cycle", records, stats) after the admissions and after each decode step:
                                                the tokens' events, what the observer saw, and
                                                (every 50 ms, and when idle) the engine's stats
                   <--("result", id, ok, value) a call's answer
                   <--("ready",)                once the warm-up (compiling) is over

Where the machine has more cores than the engine's torch threads, the child keeps to the last
`threads` of them and the HTTP loop to the others (Linux affinity): on two cores the compiled
server answered 16 streaming clients 7% faster pinned than unpinned (the bench's clients sharing
the loop's core).

The loop reads the child's messages when its pipe is readable (one unpickling per decode step,
not a thread switch per token), replays each record into the request's queue and the
server's metrics, and answers /health and /metrics from the last stats. Admission (max_batch +
max_queue, 429 beyond) is counted here, where the requests arrive, and again by the child's engine.
If the child dies, every open request ends with an error event and /health answers 503.

`serve --engine-process` (the default for a model on the CPU where there are two or more cores)
uses it; the engine thread in the server's own process remains for one core, a GPU, and tests that
reach into the engine.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import threading
import time
from concurrent.futures import Future
from functools import partial

import torch
import torch.multiprocessing as mp

from nanoseek.serve.engine import FAILED, Engine, EngineObserver, EngineUnavailable, Event, QueueFull, Sequence

log = logging.getLogger("nanoseek.serve")

STATS_EVERY_S = 0.05  # the child's stats (for /health and /metrics) at most this often while it works

# what a request's Sequence carries to the child (its emit callback and grammar are rebuilt there)
SPEC_FIELDS = (
    "prompt_ids",
    "max_tokens",
    "options",
    "stops",
    "index",
    "logprobs",
    "echo_logprobs",
    "schema",
    "arrival",
)


class EngineProcess:
    """The parent's side: `Engine`'s interface over a pipe to the child (see the module docstring)."""

    builds_grammars = True  # the child compiles each request's response_format from `Sequence.schema`

    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 32, observer=None, **engine_options):
        self.max_batch, self.max_queue = max_batch, max_queue
        self.observer = observer or EngineObserver()
        self.ready = threading.Event()  # set once the child is ready, or has died
        self.dead: str | None = None  # why the child is gone
        self.live: dict[int, Sequence] = {}  # submitted, not yet ended
        self.ids = itertools.count()
        self.calls: dict[int, Future] = {}
        self.reserved = 0
        self.last: dict = {"running": 0, "waiting": 0, "compiled": engine_options.get("compile", False)}
        context = mp.get_context("spawn")
        self.conn, child_conn = context.Pipe()
        threads = torch.get_num_threads()
        self.cores = split_cores(threads)  # (the engine's cores, the HTTP loop's), or None
        engine_cores = self.cores[0] if self.cores else None
        args = (child_conn, model, tokenizer, max_batch, max_queue, engine_options, threads, engine_cores)
        self.process = context.Process(target=child_main, args=args, name="nanoseek-engine", daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ what the app calls
    def start(self) -> EngineProcess:
        """Spawn the child and read its messages on the running loop (call from the loop)."""
        self.process.start()
        if self.cores:
            os.sched_setaffinity(0, self.cores[1])  # this thread: the loop's
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.conn.fileno(), self._readable)
        return self

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.remove_reader(self.conn.fileno())
        try:
            self.conn.send(("stop",))
        except (OSError, ValueError):
            pass
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)

    def submit(self, seqs: list[Sequence]) -> None:
        for s in seqs:  # a bad option fails its request here
            s.options.validate()
        if self.dead:
            raise EngineUnavailable(self.dead)
        self._check_room(len(seqs))
        specs = []
        for s in seqs:
            s.sid = next(self.ids)
            self.live[s.sid] = s
            specs.append({"sid": s.sid, **{f: getattr(s, f) for f in SPEC_FIELDS}})
        self.conn.send(("submit", specs))

    def cancel(self, seqs: list[Sequence]) -> None:
        ids = [s.sid for s in seqs if s.sid in self.live]
        if ids and not self.dead:
            self.conn.send(("cancel", ids))

    def reserve(self) -> None:
        self._check_room(1)
        self.reserved += 1

    def unreserve(self) -> None:
        self.reserved -= 1

    def call_with_model(self, fn, *args) -> Future:
        """fn(model, *args) in the child, between two steps (fn and args picklable)."""
        fut: Future = Future()
        if self.dead:
            fut.set_exception(RuntimeError(self.dead))
            return fut
        cid = next(self.ids)
        self.calls[cid] = fut
        self.conn.send(("call", cid, fn, args))
        return fut

    def stats(self) -> dict:
        return {**self.last, "embedding": self.reserved}

    def _check_room(self, places: int) -> None:
        busy = len(self.live) + self.reserved
        if busy + places > self.max_batch + self.max_queue:
            raise QueueFull(
                f"server busy: {busy} sequences or embedding requests running or waiting "
                f"(limit {self.max_batch} running + {self.max_queue} queued)"
            )

    # ------------------------------------------------------------------ the child's messages
    def _readable(self) -> None:
        try:
            while self.conn.poll():
                self._handle(self.conn.recv())
        except (EOFError, OSError):
            self._died("the engine process exited")

    def _handle(self, message) -> None:
        kind = message[0]
        if kind == "cycle":
            self._replay(message[1])
            if message[2] is not None:
                self.last = message[2]
        elif kind == "result":
            _, cid, ok, value = message
            fut = self.calls.pop(cid, None)
            if fut is not None:
                fut.set_result(value) if ok else fut.set_exception(RuntimeError(value))
        elif kind == "ready":
            self.ready.set()
        elif kind == "failed":
            self._died(f"the engine process failed: {message[1]}")

    def _replay(self, records: list) -> None:
        for record in records:
            kind = record[0]
            if kind == "decoded":
                self.observer.decoded(record[1])
                continue
            seq = self.live.get(record[1])
            if seq is None:  # ended already (the child's records of a cancelled request)
                continue
            if kind == "event":  # ("event", sid, text, finish_reason, completion_tokens, error, logprobs)
                event = Event(seq.index, *record[2:])
                if event.finish_reason is not None or event.error:
                    del self.live[seq.sid]
                seq.emit(event)
            elif kind == "token":
                self.observer.token(seq, record[2])
            elif kind == "prefilled":
                seq.cached_tokens = record[2]
                self.observer.prefilled(seq)
            elif kind == "ended":  # cancelled and dropped: no event follows
                del self.live[seq.sid]

    def _died(self, reason: str) -> None:
        if self.dead:
            return
        self.dead = reason
        log.error("%s; failing the open requests", reason)
        if self.loop is not None:
            self.loop.remove_reader(self.conn.fileno())
        live, self.live = list(self.live.values()), {}
        for seq in live:
            seq.emit(Event(seq.index, error=FAILED))
        calls, self.calls = list(self.calls.values()), {}
        for fut in calls:
            fut.set_exception(RuntimeError(reason))
        self.ready.set()


# ---------------------------------------------------------------------- the child


class ChildObserver(EngineObserver):
    """Records what the engine does in one iteration and sends it to the parent at its end."""

    def __init__(self, conn, send_lock: threading.Lock, engine_ref: list):
        self.conn, self.send_lock, self.engine_ref = conn, send_lock, engine_ref
        self.records: list = []
        self.live: dict[int, Sequence] = {}
        self.cancelled: set[int] = set()  # live requests the parent cancelled, until the engine drops them
        self.stats_at = 0.0

    def prefilled(self, seq) -> None:
        self.records.append(("prefilled", seq.sid, seq.cached_tokens))

    def decoded(self, rows: int) -> None:
        self.records.append(("decoded", rows))

    def token(self, seq, finished: bool) -> None:
        self.records.append(("token", seq.sid, finished))

    def flush(self) -> None:
        """Send the records, and the engine's stats at most every STATS_EVERY_S (and whenever it
        falls idle, so /health ends on the true state)."""
        engine = self.engine_ref[0]
        if self.cancelled:  # the ones the engine dropped without a last event
            with engine.wakeup:
                held = {id(s) for s in engine.running} | {id(s) for s in engine.waiting}
            for sid in list(self.cancelled):
                seq = self.live.get(sid)
                if seq is not None and id(seq) in held:
                    continue  # not dropped yet
                self.cancelled.discard(sid)
                if seq is not None:
                    del self.live[sid]
                    self.records.append(("ended", sid))
        now = time.monotonic()
        stats = None
        idle = not engine.running and not engine.waiting
        if idle or now - self.stats_at >= STATS_EVERY_S:
            stats, self.stats_at = engine.stats(), now
        if self.records or stats is not None:
            records, self.records = self.records, []
            send(self.conn, self.send_lock, ("cycle", records, stats))


def send(conn, lock: threading.Lock, message) -> None:
    with lock:
        conn.send(message)


def split_cores(threads: int) -> tuple[list[int], list[int]] | None:
    """(the engine process's cores, the HTTP loop's): the last `threads` of the cores this process may
    use, and the others; None where there are no more cores than threads, or no affinity (not Linux)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) <= threads:
        return None
    return cores[-threads:], cores[:-threads]


def child_main(conn, model, tokenizer, max_batch, max_queue, engine_options, threads, cores) -> None:
    """The engine process: build the engine, then turn the parent's messages into engine calls."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops us
    if cores:  # before the engine thread and torch's threads exist: they inherit it
        os.sched_setaffinity(0, cores)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(threads)
    lock = threading.Lock()
    engine_ref: list = []
    observer = ChildObserver(conn, lock, engine_ref)
    try:
        engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, observer=observer, **engine_options)
    except Exception as e:  # e.g. the cache does not fit
        send(conn, lock, ("failed", f"{type(e).__name__}: {e}"))
        return
    engine_ref.append(engine)
    engine.start(wait=True)
    send(conn, lock, ("cycle", [], engine.stats()))
    send(conn, lock, ("ready",))
    grammars = ChildGrammars(tokenizer, model.config.vocab_size)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            break
        kind = message[0]
        if kind == "stop":
            break
        if kind == "submit":
            submit_specs(engine, observer, grammars, conn, lock, message[1])
        elif kind == "cancel":
            seqs = [s for s in (observer.live.get(sid) for sid in message[1]) if s is not None]
            engine.cancel(seqs)
            observer.cancelled.update(s.sid for s in seqs)
        elif kind == "call":
            _, cid, fn, args = message
            future = engine.call_with_model(fn, *args)
            future.add_done_callback(partial(report_result, conn, lock, cid))
    engine.stop()


def submit_specs(engine: Engine, observer: ChildObserver, grammars, conn, lock, specs: list[dict]) -> None:
    seqs = []
    for spec in specs:
        sid = spec["sid"]
        seq = Sequence(emit=partial(record_event, observer, sid), **spec)
        try:
            seq.constraint = grammars.constraint(seq.schema) if seq.schema is not None else None
        except Exception as e:  # compiled once in the parent already: not expected
            log.exception("compiling a response_format grammar in the engine process failed")
            failure = Event(seq.index, error=f"{type(e).__name__}: {e}")
            send(conn, lock, ("cycle", [event_record(sid, failure)], engine.stats()))
            continue
        observer.live[sid] = seq
        seqs.append(seq)
    try:
        engine.submit(seqs)
    except QueueFull as e:  # the parent counted the same limit: only after a race with cancellations
        for seq in seqs:
            del observer.live[seq.sid]
        records = [event_record(s.sid, Event(s.index, error=str(e))) for s in seqs]
        send(conn, lock, ("cycle", records, engine.stats()))


def record_event(observer: ChildObserver, sid: int, event: Event) -> None:
    if event.finish_reason is not None or event.error:
        observer.live.pop(sid, None)
    observer.records.append(event_record(sid, event))


def event_record(sid: int, e: Event) -> tuple:
    """An event as a plain tuple (pickled several times faster than the dataclass)."""
    return ("event", sid, e.text, e.finish_reason, e.completion_tokens, e.error, e.logprobs)


def report_result(conn, lock, cid: int, future: Future) -> None:
    error = future.exception()
    message = ("result", cid, True, future.result()) if error is None else ("result", cid, False, str(error))
    send(conn, lock, message)


class ChildGrammars:
    """The response_format grammars of the engine process, compiled once per schema."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.structured = None
        self.compiled: dict[str, object] = {}

    def constraint(self, schema: dict):
        import json

        from nanoseek.serve.structured import StructuredOutput

        if self.structured is None:
            self.structured = StructuredOutput(self.tokenizer, self.vocab_size)
        key = json.dumps(schema, sort_keys=True)
        if key not in self.compiled:
            self.compiled[key] = self.structured.compile(schema)
        return self.structured.constraint(self.compiled[key])
