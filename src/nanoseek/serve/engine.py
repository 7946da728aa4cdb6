"""Continuous batching: one decode step advances every running request at once.

The engine owns the model and one static KV cache of `max_batch` rows; a background thread runs

    loop:
        drop cancelled requests (their rows are freed at once)
        admit waiting requests while rows are free: those that arrived together and start at the
            same position are prefilled in one batch (right-padded to the longest where every
            cache masks by position, else only prompts of one length), each into its own row;
            sample their first tokens
        decode: one forward over the last token of every running row, each at its own position
            p_b, attending to cached keys 0..p_b of its own row (per-row positions and masks);
            sample each row with its own options and seeded generator
        a request that finishes (stop string, eos, max_tokens) or is cancelled leaves; the last
            running row moves into its place, so the running rows are always rows 0..n-1
        a row whose cache is full slides: its most recent context // 2 tokens are prefilled again
            into its row, and it goes on from there (the rule `sample` and `chat` follow too)

Requests join and leave between decode steps, so a short request never waits for a long one and
16 concurrent clients share one forward pass per token instead of taking turns. Admission is
bounded: `submit` refuses (QueueFull) once running + waiting would exceed max_batch + max_queue;
an embeddings request holds one of those places while it runs (`reserve`), in `call` jobs of a few
hundred tokens each, so it takes turns with the decode steps instead of stalling them.

What it shares with the token loop of `nanoseek.generation` (`TokenLoop`, `TextStream`): each row
samples with its own `Sampler` (options, seeded generator, unknown ids masked, repetition penalty
over the row's prompt and output), and its text and finishing rule come from its `Detokenizer`
(UTF-8 safe, stop strings held back; "stop" at eos or a stop string, "length" at max_tokens). What
stays here is the scheduling, which `TokenLoop` (one batch of equal
prompts, one cache of its own) cannot express: rows of different lengths in one cache, joining and
leaving between steps. Text leaves one `Event` per piece, through the request's `emit` callback
(the server hands them to its asyncio loop).

Per-sequence extras, each off unless asked: `logprobs` records the model's logprobs of each sampled
token (and of the prompt with `echo_logprobs`: the prefill then keeps every position's logits),
handed out with the events (serve/logprobs.py); `constraint` masks the row's logits before sampling
and follows the sampled tokens (response_format, serve/structured.py); an `EngineObserver` hears of
prefills, decode steps and tokens (serve/metrics.py).

Two speed-ups, each tested to give the tokens of the plain engine: `compile=True` runs the decode
step compiled on a few padded shapes (serve/fast_decode.py) and, where the caches allow padding, a
prompt prefilled alone through compiled windows of fixed shape (serve/fast_prefill.py), both
compiled by `warm_up` before the first request; `prefix_cache_bytes` keeps the KV blocks of
earlier prompts and copies them into the row of a new prompt that starts the same way, so its
prefill starts after them (serve/prefix_cache.py).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial

import torch

from nanoseek.errors import NanoseekError
from nanoseek.generation.compiled import DecodeOptions
from nanoseek.generation.sampling import Sampler, SamplingOptions, sample_rows
from nanoseek.generation.steps import decode_step, prefill, prefill_rows
from nanoseek.generation.streaming import Detokenizer
from nanoseek.serve.fast_decode import FastDecode
from nanoseek.serve.fast_prefill import FastPrefill, supports_padding
from nanoseek.serve.logprobs import position_logprobs, prefill_with_prompt_logprobs
from nanoseek.serve.prefix_cache import PrefixCache, refusal

log = logging.getLogger("nanoseek.serve")


FAILED = "internal error in the generation engine"
PREFILL_GROUP_TOKENS = 4096  # padded tokens (rows x longest prompt) of one batched prefill


class QueueFull(Exception):
    """More requests than running rows plus queue places."""


class EngineUnavailable(Exception):
    """The engine cannot take work (its process has exited): the server answers 503."""


@dataclass
class Event:
    index: int  # the choice this text belongs to
    text: str = ""
    finish_reason: str | None = None  # "stop" / "length" on the last event of a choice
    completion_tokens: int = 0
    error: str | None = None
    logprobs: list | None = None  # TokenLogprobs recorded since the previous event (logprobs asked)


class EngineObserver:
    """What the engine reports as it works (serve/metrics.py counts it); called on the engine thread."""

    def prefilled(self, seq: Sequence) -> None: ...

    def decoded(self, rows: int) -> None: ...

    def token(self, seq: Sequence, finished: bool) -> None: ...

    def flush(self) -> None:
        """What was reported so far can go out: called after the admissions and at the end of each
        pass of the engine loop."""


@dataclass(eq=False)
class Sequence:
    """One choice of one request: its prompt, options, and where it stands."""

    prompt_ids: list[int]
    max_tokens: int
    options: SamplingOptions
    emit: Callable[[Event], None]
    stops: list[str] = field(default_factory=list)
    index: int = 0
    cancelled: bool = False
    generated: int = 0
    last_token: int = -1
    output_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None  # record each generated token's logprob and the top-N (None: off)
    echo_logprobs: bool = False  # record the prompt's logprobs too (prefill keeps every position)
    constraint: object | None = None  # a response_format grammar (serve/structured.py): masks, accepts
    recorded: list = field(default_factory=list)  # TokenLogprobs, prompt first, not yet emitted
    arrival: float = field(default_factory=time.monotonic)
    dropped: int = 0  # tokens slid out of the row's cache (past the context)
    cached_tokens: int = 0  # prompt positions whose cache entries came from the prefix cache
    prefix_chain: list = field(default_factory=list)  # the prefix cache's blocks of the prompt, found at admission
    schema: dict | None = None  # response_format's JSON schema (an engine process builds its own constraint)
    sid: int = -1  # its id between an EngineProcess and its child

    @property
    def position(self) -> int:
        """Position of `last_token` in the row's cache, the token the next decode step feeds."""
        return len(self.prompt_ids) + self.generated - 1 - self.dropped


def cache_bytes_per_row(model, context: int) -> int:
    """Bytes of one row of the static KV cache for `context` positions (measured on the meta device)."""
    tensors = []
    for layer in model.make_cache(1, context, device="meta"):
        for value in vars(layer).values():
            tensors += value.values() if isinstance(value, dict) else [value]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def free_memory(device: torch.device) -> int | None:
    """Bytes free on `device` (MemAvailable for the CPU, on Linux); None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError, IndexError):
            return None
    return None


def check_cache_fits(model, rows: int, context: int, device: torch.device) -> None:
    """NanoseekError, before anything is allocated, when `rows` cache rows cannot fit in free memory."""
    need = rows * cache_bytes_per_row(model, context)
    free = free_memory(device)
    if free is not None and need > free:
        raise NanoseekError(
            f"max batch {rows} needs a KV cache of {need / 2**30:,.1f} GiB ({rows} rows x {context} positions); "
            f"{device} has {free / 2**30:,.1f} GiB free: lower --max-batch"
        )


class Engine:
    """`compile`: decode with the compiled step (`FastDecode`: its padded batch sizes
    `compile_batch_sizes`, default powers of two up to max_batch; `decode_options` its fast paths)
    and prefill short prompts alone through `FastPrefill`'s windows, both compiled when the engine
    starts. `prefix_cache_bytes` > 0: a prefix cache of at most that many
    bytes (refused, with a warning, for a model whose cache kind it does not know)."""

    builds_grammars = False  # the app builds each request's response_format matcher (EngineProcess: True)

    def __init__(
        self,
        model,
        tokenizer,
        max_batch: int = 8,
        max_queue: int = 32,
        observer=None,
        compile: bool = False,
        compile_batch_sizes: list[int] | None = None,
        decode_options: DecodeOptions | None = None,
        prefix_cache_bytes: int = 0,
    ):
        if max_batch < 1 or max_queue < 0 or prefix_cache_bytes < 0:
            raise ValueError(
                f"max_batch={max_batch} must be >= 1, max_queue={max_queue} >= 0 "
                f"and prefix_cache_bytes={prefix_cache_bytes} >= 0"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = model.config.max_position_embeddings
        self.device = next(model.parameters()).device
        check_cache_fits(model, max_batch, self.context, self.device)
        self.cache = model.make_cache(max_batch, self.context)
        self.fast = (
            FastDecode(model, self.cache, max_batch, self.context, decode_options, compile_batch_sizes)
            if compile
            else None
        )
        self.prefix = self._prefix_cache(prefix_cache_bytes)
        # right-padded batched prefills only where every cache masks keys by position (prefill_rows)
        self.pads_prefills = supports_padding(self.cache)
        # a prompt prefilled alone goes through the compiled windows (same condition: they pad)
        self.fast_prefill = FastPrefill(model, self.context) if compile and self.pads_prefills else None
        self.ready = threading.Event()  # set once the warm-up is over (at once without `compile`)
        self.running: list[Sequence] = []  # running[i] owns cache row i
        self.waiting: deque[Sequence] = deque()
        self.jobs: deque[tuple[Callable, Future]] = deque()
        self.wakeup = threading.Condition()
        self.stopping = False
        self.reserved = 0  # places held by work beside the batch (embeddings requests)
        self.steps = self.tokens_out = 0
        self.observer = observer or EngineObserver()
        self.thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)

    # ------------------------------------------------------------------ the server's side
    def _prefix_cache(self, max_bytes: int) -> PrefixCache | None:
        if not max_bytes:
            return None
        reason = refusal(self.model)
        if reason is not None:
            log.warning("serving without a prefix cache: %s", reason)
            return None
        return PrefixCache(self.model, max_bytes)

    def start(self, wait: bool = False) -> Engine:
        """Start the engine thread (it first compiles, with `compile`); `wait`: return once it is ready."""
        self.thread.start()
        if wait:
            self.ready.wait()
        return self

    def stop(self) -> None:
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify()
        self.thread.join(timeout=10)

    def submit(self, seqs: list[Sequence]) -> None:
        for s in seqs:  # a bad option fails its request here, not the engine thread
            s.options.validate()
        with self.wakeup:
            self._check_room(len(seqs))
            self.waiting.extend(seqs)
            self.wakeup.notify()

    def reserve(self) -> None:
        """Hold one place of the admission limit for work beside the batch (an embeddings request, run
        in `call` jobs); QueueFull when none is free. Give it back with `unreserve`."""
        with self.wakeup:
            self._check_room(1)
            self.reserved += 1

    def unreserve(self) -> None:
        with self.wakeup:
            self.reserved -= 1

    def _check_room(self, places: int) -> None:
        busy = len(self.running) + len(self.waiting) + self.reserved
        if busy + places > self.max_batch + self.max_queue:
            raise QueueFull(
                f"server busy: {busy} sequences or embedding requests running or waiting "
                f"(limit {self.max_batch} running + {self.max_queue} queued)"
            )

    def cancel(self, seqs: list[Sequence]) -> None:
        with self.wakeup:
            for s in seqs:
                s.cancelled = True
            self.wakeup.notify()

    def call_with_model(self, fn: Callable, *args) -> Future:
        """fn(model, *args) on the engine thread between steps (as an EngineProcess runs it in its child)."""
        return self.call(partial(fn, self.model, *args))

    def call(self, fn: Callable) -> Future:
        """Run fn() on the engine thread between steps (the model is never used by two threads)."""
        fut: Future = Future()
        with self.wakeup:
            self.jobs.append((fn, fut))
            self.wakeup.notify()
        return fut

    def stats(self) -> dict:
        with self.wakeup:
            return {
                "running": len(self.running),
                "waiting": len(self.waiting),
                "embedding": self.reserved,
                "max_batch": self.max_batch,
                "max_queue": self.max_queue,
                "decode_steps": self.steps,
                "tokens_generated": self.tokens_out,
                "compiled": self.fast is not None,
                "compiled_prefill": self.prefill_compiled,
                **(self.prefix.summary() if self.prefix is not None else {}),
            }

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        self._warm_up()
        with torch.inference_mode():  # entered once: per pass it cost ~2% of a busy engine's time
            self._loop()

    def _loop(self) -> None:
        while True:
            with self.wakeup:
                while not (self.stopping or self.waiting or self.running or self.jobs):
                    self.wakeup.wait()
                if self.stopping:
                    break
                jobs, self.jobs = list(self.jobs), deque()
            try:
                self._run_jobs(jobs)
                self._drop_cancelled()
                self._admit()
                self.observer.flush()  # first tokens go out before the decode step
                if self.running:
                    self._decode()
            except Exception:  # a bug outside any one request must not kill the engine: fail the running ones
                message = traceback.format_exc(limit=3)
                log.error("engine step failed:\n%s", message)
                failed, self.running = self.running, []
                for seq in failed:
                    self._report_failure(seq)
            self.observer.flush()

    def _warm_up(self) -> None:
        """Compile the decode step's shapes and the prefill's windows before any request arrives;
        whichever fails runs eagerly."""
        try:
            self.fast = self._warmed(self.fast, "decode step", "decoding eagerly")
            self.fast_prefill = self._warmed(self.fast_prefill, "prefill", "prefilling eagerly")
        finally:
            self.ready.set()

    @staticmethod
    def _warmed(fast, what: str, otherwise: str):
        """`fast` (FastDecode or FastPrefill) compiled, or None: when it is None or compiling failed."""
        if fast is None:
            return None
        try:
            with torch.inference_mode():  # the state the steps will run in, which dynamo guards on
                seconds = fast.warm_up()
        except Exception as error:  # no C++ compiler, an op inductor cannot compile, ...
            log.warning("compiling the %s failed (%s: %s); %s", what, type(error).__name__, error, otherwise)
            return None
        log.info("compiled %s ready in %.1f s", what, seconds)
        return fast

    @property
    def prefill_compiled(self) -> bool:
        """Whether prompts prefilled alone go through the compiled windows now."""
        return self.fast_prefill is not None and self.fast_prefill.ready

    def _run_jobs(self, jobs) -> None:
        for fn, fut in jobs:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except Exception as e:  # handed to the caller
                    fut.set_exception(e)

    def _drop_cancelled(self) -> None:
        with self.wakeup:
            self.waiting = deque(s for s in self.waiting if not s.cancelled)
        self._release([s for s in self.running if s.cancelled])

    def _admit(self) -> None:
        """Prefill waiting requests into the free rows, a group at a time (`_next_group`), and
        sample each one's first token."""
        while len(self.running) < self.max_batch:
            group = self._next_group()
            if not group:
                return
            lo = len(self.running)
            self.running.extend(group)  # from here on, a failure reaches these requests too
            first = self._prefill_group(group, lo)
            ready = [(seq, logits) for seq, logits in zip(group, first) if logits is not None]
            self._fail([seq for seq, logits in zip(group, first) if logits is None])
            echo_only = [seq for seq, _ in ready if seq.max_tokens == 0]
            for seq in echo_only:  # the prompt (and its logprobs), nothing generated
                try:
                    seq.emit(Event(seq.index, "", "length", 0, logprobs=seq.recorded))
                except Exception:  # its client is gone: it ends alone, as below
                    log.exception("emitting the echoed prompt failed; ending that request")
            self._release(echo_only)
            ready = [(seq, logits) for seq, logits in ready if seq.max_tokens != 0]
            if ready:
                self._start_rows([seq for seq, _ in ready], torch.cat([logits for _, logits in ready]))

    def _start_rows(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Sample the first token of freshly prefilled `seqs` from their logits (n, V)."""
        try:
            tokens = self._sample(logits, seqs)
        except Exception:
            log.exception("sampling the first tokens failed; ending those requests")
            tokens = [None] * len(seqs)
        self._take(seqs, tokens)

    def _take(self, seqs: list[Sequence], tokens: list[int | None]) -> None:
        """Accept each row's sampled token (None: its sampling failed); the finished rows leave, the
        failed ones end alone."""
        done, failed = [], []
        for seq, token in zip(seqs, tokens):
            try:
                if token is None:
                    failed.append(seq)
                elif self._accept(seq, token):
                    done.append(seq)
            except Exception:
                log.exception("emitting a token failed; ending that request")
                failed.append(seq)
        self._release(done)
        self._fail(failed)

    def _next_group(self) -> list[Sequence]:
        """The waiting requests to prefill together, in arrival order, as many as there are free rows:
        those that start at the same position (the prefix cache restored as much of each) and,
        unless every cache masks by position (`pads_prefills`), have as many tokens left; a
        request that wants its prompt's logprobs goes alone. The padded group stays within
        PREFILL_GROUP_TOKENS and at most twice the tokens it holds."""
        group: list[Sequence] = []
        with self.wakeup:
            while self.waiting and len(self.running) + len(group) < self.max_batch:
                seq = self.waiting[0]
                # none when its prompt logprobs are asked: they need every position
                use_prefix = self.prefix is not None and not seq.echo_logprobs
                chain = self.prefix.lookup(seq.prompt_ids) if use_prefix else []
                if group and not self._joins(group, seq, chain):
                    break
                if use_prefix:
                    self.prefix.record(seq.prompt_ids, chain)
                seq.prefix_chain = chain
                group.append(self.waiting.popleft())
                if seq.echo_logprobs:
                    break
        return group

    def _joins(self, group: list[Sequence], seq: Sequence, chain: list) -> bool:
        if seq.echo_logprobs or group[0].echo_logprobs or len(chain) != len(group[0].prefix_chain):
            return False
        start = len(chain) * (self.prefix.block if chain else 0)
        lengths = [len(s.prompt_ids) - start for s in group] + [len(seq.prompt_ids) - start]
        if not self.pads_prefills:
            return len(set(lengths)) == 1
        padded = len(lengths) * max(lengths)
        return padded <= PREFILL_GROUP_TOKENS and padded <= 2 * sum(lengths)

    def _prefill_group(self, group: list[Sequence], lo: int) -> list[torch.Tensor | None]:
        """The logits (1, V) of each sequence's first token, its prompt prefilled into cache row
        lo + i (None where that failed): the group in one batched prefill, or, should that raise,
        each sequence alone, so only the ones that fail on their own end."""
        if len(group) > 1:
            try:
                return list(self._prefill_batch(group, lo).split(1))
            except Exception:
                log.exception("batched prefill of %d prompts failed; prefilling them one by one", len(group))
        first: list[torch.Tensor | None] = []
        for i, seq in enumerate(group):
            try:
                first.append(self._prefill(seq, lo + i))
            except Exception:
                log.exception("prefill failed; ending that request")
                first.append(None)
        return first

    def _prepare(self, seq: Sequence) -> list:
        """Set up the per-request state a prefill needs; return the request's prefix-cache chain."""
        seq.detok = Detokenizer(self.tokenizer, seq.stops, max_tokens=seq.max_tokens)  # past the context: slides
        seq.sampler = Sampler(seq.options, self.device, self.tokenizer)
        return seq.prefix_chain

    def _prefill(self, seq: Sequence, row: int) -> torch.Tensor:
        """Prompt of `seq` into cache row `row`, after the blocks the prefix cache has of it (none when
        the prompt's own logprobs are asked: they need every position); the logits (1, V) of its
        first token."""
        chain = self._prepare(seq)
        view = [c.rows(row, row + 1) for c in self.cache]
        if seq.echo_logprobs:
            logits, seq.recorded = prefill_with_prompt_logprobs(self.model, seq.prompt_ids, view, seq.logprobs)
        else:
            seq.cached_tokens = begin = self.prefix.restore(chain, view) if chain else 0
            logits = self._fast_prefill(seq, begin, view)
            if logits is None:  # eagerly: no compiled prefill, a long prompt, a window not compiled, a failure
                rest = torch.tensor([seq.prompt_ids[begin:]], device=self.device)
                logits = prefill(self.model, rest, view, start=begin)
        self._store(seq, view, chain)
        return logits

    def _fast_prefill(self, seq: Sequence, begin: int, view: list) -> torch.Tensor | None:
        """The compiled prefill's logits, or None (then the caller prefills eagerly): it writes the
        row only once every window has run, so after a failure the eager prefill starts clean."""
        if self.fast_prefill is None:
            return None
        try:
            return self.fast_prefill(seq.prompt_ids, begin, view)
        except Exception:
            log.exception("compiled prefill failed; prefilling that request eagerly")
            return None

    def _prefill_batch(self, group: list[Sequence], lo: int) -> torch.Tensor:
        """The group's prompts (each after the prefix blocks restored into its row, as many for
        each) into rows lo..lo+n-1 in one batched prefill (`prefill_rows`); their logits (n, V)."""
        rows = [[c.rows(r, r + 1) for c in self.cache] for r in range(lo, lo + len(group))]
        chains = [self._prepare(seq) for seq in group]
        for seq, view, chain in zip(group, rows, chains):
            seq.cached_tokens = self.prefix.restore(chain, view) if chain else 0
        start = group[0].cached_tokens
        view = [c.rows(lo, lo + len(group)) for c in self.cache]
        logits = prefill_rows(self.model, [seq.prompt_ids[start:] for seq in group], view, start)
        for seq, row, chain in zip(group, rows, chains):
            self._store(seq, row, chain)
        return logits

    def _store(self, seq: Sequence, view: list, chain: list) -> None:
        if self.prefix is not None:
            self.prefix.store(seq.prompt_ids, view, chain)
        self.observer.prefilled(seq)

    def _decode(self) -> None:
        """One step for every running row. Isolation: when the batched step raises, each row is
        stepped alone, eagerly (rewriting its cache position is harmless), so only the rows that fail
        on their own end, with an error event; a row whose sampling or text fails ends alone too."""
        seqs = list(self.running)
        try:
            tokens = self._sample(self._forward(0, len(seqs)), seqs)
        except Exception:
            log.exception("decode step of %d rows failed; stepping them one by one", len(seqs))
            tokens = [self._decode_alone(row) for row in range(len(seqs))]
        self.steps += 1
        self.observer.decoded(len(seqs))
        self._take(seqs, tokens)

    def _decode_alone(self, row: int) -> int | None:
        try:
            return self._sample(self._forward(row, row + 1, compiled=False), [self.running[row]])[0]
        except Exception:
            log.exception("decode step of one request failed; ending that request")
            return None

    def _forward(self, lo: int, hi: int, compiled: bool = True) -> torch.Tensor:
        """Logits (hi - lo, V) of one decode step of running rows lo..hi-1, each at its own position:
        by the compiled step for the rows from 0 when the engine compiles, else eagerly over the keys
        in use."""
        seqs = self.running[lo:hi]
        tokens = torch.tensor([[s.last_token] for s in seqs], device=self.device)
        positions = torch.tensor([s.position for s in seqs], device=self.device)
        last = max(s.position for s in seqs)
        if compiled and self.fast is not None and lo == 0:
            return self.fast.step(tokens, positions, last)
        view = [c.rows(lo, hi, last + 1) for c in self.cache]
        return decode_step(self.model, tokens, view, positions)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int | None]:
        """One token per row, each by its own sampler (the greedy rows in one argmax), after the row's
        grammar mask; None for a row whose masking, sampling or bookkeeping raised (the others draw
        exactly as they would without it)."""
        failed: set[int] = set()

        def fail(i: int, error: Exception) -> None:
            log.error("sampling failed (%s: %s); ending that request", type(error).__name__, error)
            failed.add(i)

        seen = [self._seen(s) for s in seqs]
        masked = logits
        for i, s in enumerate(seqs):
            if s.constraint is not None:  # response_format: only what the grammar accepts next
                try:
                    masked = masked.clone() if masked is logits else masked
                    masked[i] = s.constraint.mask(logits[i], s.detok.max_tokens - s.generated)
                except Exception as e:
                    fail(i, e)
        tokens = sample_rows(masked, [s.sampler for s in seqs], seen, on_error=fail)
        tokens = [None if i in failed else t for i, t in enumerate(tokens)]
        self._record_logprobs(logits, seqs, tokens, fail)
        for i, (s, t) in enumerate(zip(seqs, tokens)):
            if s.constraint is not None and t is not None and i not in failed:
                try:
                    s.constraint.accept(t)
                except Exception as e:
                    fail(i, e)
        return [None if i in failed else t for i, t in enumerate(tokens)]

    def _record_logprobs(self, logits: torch.Tensor, seqs: list[Sequence], tokens: list, fail) -> None:
        """The model's own logprobs of the sampled tokens (before any mask), for rows that asked; a row
        whose recording raises is handed to `fail`."""
        rows = [i for i, s in enumerate(seqs) if s.logprobs is not None and tokens[i] is not None]
        try:
            self._record_rows(logits, seqs, tokens, rows)
        except Exception:
            for i in rows:  # find the row that fails alone; the others record as they would have
                try:
                    self._record_rows(logits, seqs, tokens, [i])
                except Exception as e:
                    fail(i, e)

    @staticmethod
    def _record_rows(logits: torch.Tensor, seqs: list[Sequence], tokens: list, rows: list[int]) -> None:
        if rows:
            top = max(seqs[i].logprobs for i in rows)
            entries = position_logprobs(logits[rows], [tokens[i] for i in rows], top)
            for i, e in zip(rows, entries):
                e.top = e.top[: seqs[i].logprobs]
                seqs[i].recorded.append(e)

    def _fail(self, seqs: list[Sequence]) -> None:
        """End `seqs` with an error event and free their rows; nobody else is touched."""
        for seq in seqs:
            self._report_failure(seq)
        self._release(seqs)

    @staticmethod
    def _report_failure(seq: Sequence) -> None:
        try:
            seq.emit(Event(seq.index, error=FAILED))
        except Exception:  # the client's loop is gone: nothing left to tell
            log.exception("could not report a failed request")

    def _seen(self, seq: Sequence) -> torch.Tensor | None:
        """The ids the repetition penalty acts on, for rows that have one."""
        if seq.options.repetition_penalty == 1.0:
            return None
        return torch.tensor([seq.prompt_ids + seq.output_ids], device=self.device)

    def _accept(self, seq: Sequence, token: int) -> bool:
        """Record the sampled token, emit its text; True when the sequence has finished."""
        seq.generated += 1
        seq.last_token = token
        seq.output_ids.append(token)
        self.tokens_out += 1
        text = seq.detok.push(token)
        reason = seq.detok.finish_reason
        if reason == "stop" and getattr(seq.constraint, "steered", False):
            reason = "length"  # the JSON was closed early for lack of tokens
        self.observer.token(seq, reason is not None)
        if reason or text:
            recorded, seq.recorded = (seq.recorded, []) if seq.logprobs is not None else (None, seq.recorded)
            seq.emit(Event(seq.index, text, reason, seq.generated, logprobs=recorded))
        if reason is None and seq.position >= self.context:
            return self._slide(seq)
        return reason is not None

    def _slide(self, seq: Sequence) -> bool:
        """The row's cache is full: keep its most recent context // 2 tokens (the newest sampled one
        last), prefill them into its row again and sample on; True when the sequence finished. A
        failure raises, to end this request alone as any failure of its step does."""
        keep = (seq.prompt_ids + seq.output_ids)[-(self.context // 2) :]
        seq.dropped = len(seq.prompt_ids) + seq.generated - len(keep)
        row = self.running.index(seq)
        view = [c.rows(row, row + 1) for c in self.cache]
        logits = prefill(self.model, torch.tensor([keep], device=self.device), view)
        token = self._sample(logits, [seq])[0]
        if token is None:
            raise RuntimeError("sampling after sliding past the context failed")
        return self._accept(seq, token)

    def _release(self, seqs: list[Sequence]) -> None:
        """Remove finished or cancelled sequences; move the last running rows into the gaps."""
        for seq in seqs:
            row = self.running.index(seq)
            last = len(self.running) - 1
            if row != last:
                for c in self.cache:
                    c.move_row(last, row)
                self.running[row] = self.running[last]
            self.running.pop()
