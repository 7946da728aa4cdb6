"""Autoregressive generation with a static key/value cache, and text streaming on top of it.

Method (as gpt-fast and HF `generate` do it):

1. Allocate one static cache per layer for exactly P + N positions (P prompt tokens, N new ones).
2. Prefill: one forward over the prompt at positions 0..P-1 writes every layer's keys/values into
   the cache; only the last position's logits are kept (`last_only=True`).
3. Decode: each step feeds the single token just sampled at position p and attends to the cached
   positions 0..p, so a step costs one token's forward instead of the whole sequence's.
4. Sampling turns the logits (B, V) into the next token (B,), batched, in this order:
       repetition penalty (CTRL): for tokens already seen, l -> l / r if l > 0 else l * r
       temperature 0: argmax (greedy)
       l -> l / T;  top-k: keep the k largest;  top-p (nucleus): keep the smallest set of most
       likely tokens whose total probability is >= p (the most likely token always stays)
       x ~ Multinomial(softmax(l)), drawn from a local `torch.Generator` when a seed is given.
5. A row ends when it emits a stop id (eos); it then repeats that id, and the loop ends when
   every row has ended or N tokens were made.

`TextStream` runs the same loop for one prompt and yields text as it comes: token bytes go through
an incremental UTF-8 decoder (a character split over tokens waits for its last byte), and the last
`len(longest stop string) - 1` characters are held back until no stop string can start in them.

    >>> model = Transformer(ModelConfig.from_preset("gpt2-tiny")).eval()
    >>> generate(model, [1, 2, 3], max_new_tokens=4, temperature=0).shape
    torch.Size([4])
"""

from __future__ import annotations

import codecs
import os
import threading
import types
import warnings
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from nanoseek.errors import NanoseekError

FINISH_REASONS = ("stop", "length")


# ---------------------------------------------------------------------------- forward passes


def prefill(model, input_ids: torch.Tensor, cache: list) -> torch.Tensor:
    """Run the prompt (B, P) at positions 0..P-1, filling `cache`; return the last logits (B, V)."""
    return model(input_ids, cache=cache, start=0, last_only=True).logits[:, -1]


RECOMPILE_LIMIT = 64  # graphs of one compiled function shared by every model (batch sizes x lengths x models)


def shared_function_recompile_limit():
    """Raise dynamo's limit of 8 graphs per function for the prefill and decode-step functions, which
    every model, batch size and length bucket compiles (past the limit dynamo would run them eager)."""
    return torch._dynamo.config.patch(recompile_limit=max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit))


def compiled_prefill(model):
    """`prefill` for this model under torch.compile with dynamic shapes (built at first use, kept on
    the model): a prompt of another length reuses the graph (tested); batch 1, one-token prompts, a
    batch equal to another dimension of the first call (dynamo's duck sizing) or the MoE's few-token
    path may compile graphs of their own. Opt-in (`generate(..., compile_prefill=True)`): the first
    compile is long (on this CPU ~18 s for llama-tiny, ~60 s for deepseek-v3-small, ~7 minutes for
    deepseek-v4-tiny); after it, deepseek-v3-small prefills 512 tokens with ~18% more tokens/s."""
    fn = model.__dict__.get("_compiled_prefill")
    if fn is None:
        fn = model.__dict__["_compiled_prefill"] = torch.compile(lambda ids, cache: prefill(model, ids, cache),
                                                                 dynamic=True)

    def run(ids: torch.Tensor, cache) -> torch.Tensor:
        # a fresh contiguous copy: a sliced prompt's stride, or a tensor made outside inference mode,
        # would each fail a guard and compile a new graph
        with shared_function_recompile_limit():
            return fn(ids.clone(memory_format=torch.contiguous_format), cache)

    return run


def decode_step(model, token: torch.Tensor, cache: list, pos: int) -> torch.Tensor:
    """Run one token (B, 1) at position `pos` against the cache; return its logits (B, V)."""
    return model(token, cache=cache, start=pos).logits[:, -1]


# ---------------------------------------------------------------------------- sampling


def apply_repetition_penalty(logits: torch.Tensor, recent_tokens: torch.Tensor | None,
                             penalty: float) -> torch.Tensor:
    """CTRL penalty: divide positive logits of seen tokens by `penalty`, multiply negative ones."""
    if penalty == 1.0 or recent_tokens is None or recent_tokens.numel() == 0:
        return logits
    seen = logits.gather(-1, recent_tokens)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(-1, recent_tokens, seen)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf."""
    k = min(k, logits.shape[-1])
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability sums to >= p; -inf the rest."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the tokens ranked above
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False  # the most likely token always stays
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None,
                recent_tokens: torch.Tensor | None = None,
                repetition_penalty: float = 1.0) -> torch.Tensor:
    """Next token ids (B,) int64 from logits (B, V); temperature 0 is greedy."""
    logits = apply_repetition_penalty(logits.float(), recent_tokens, repetition_penalty)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def mask_unknown_ids(logits: torch.Tensor, tokenizer) -> torch.Tensor:
    """-inf for ids at or past the tokenizer's vocabulary (a model may pad its vocabulary)."""
    size = getattr(tokenizer, "vocab_size", None)
    if isinstance(size, int) and size < logits.shape[-1]:
        logits = logits.clone()
        logits[..., size:] = float("-inf")
    return logits


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> None:
        if self.temperature < 0:
            raise NanoseekError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise NanoseekError(f"top_k={self.top_k} must be >= 1 (or None for no limit)")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise NanoseekError(f"top_p={self.top_p} must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise NanoseekError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1 = off)")

    def make_generator(self, device: torch.device) -> torch.Generator | None:
        """A local generator seeded with `seed`; None (the global RNG) when there is no seed."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


# ---------------------------------------------------------------------------- the generation core


def model_device(model, fallback: torch.device) -> torch.device:
    """Device of the model's first parameter; `fallback` for a model without parameters."""
    params = model.parameters() if hasattr(model, "parameters") else iter(())
    first = next(iter(params), None)
    return fallback if first is None else first.device


def as_batch(input_ids: torch.Tensor | Sequence[int], device: torch.device | None = None
             ) -> tuple[torch.Tensor, bool]:
    """(B, P) int64 prompt ids and whether the input was a single 1-D prompt."""
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.tensor(list(input_ids), dtype=torch.long)
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise NanoseekError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() not in (1, 2):
        raise NanoseekError(f"input_ids must be (T,) or (B, T), got shape {tuple(input_ids.shape)}")
    single = input_ids.dim() == 1
    batch = input_ids.unsqueeze(0) if single else input_ids
    device = device if device is not None else batch.device
    return batch.to(device=device, dtype=torch.long), single


def check_lengths(prompt_len: int, max_new_tokens: int, context: int) -> None:
    if prompt_len == 0:
        raise NanoseekError("the prompt is empty: generation needs at least one prompt token")
    if max_new_tokens < 0:
        raise NanoseekError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if prompt_len + max_new_tokens > context:
        raise NanoseekError(
            f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} = "
            f"{prompt_len + max_new_tokens} exceeds the context limit of {context} positions "
            f"(max_position_embeddings); shorten the prompt or lower max_new_tokens")


DECODE_CACHE_MIN = 256  # the shortest static cache a compiled decoder keeps (positions)


def decode_cache_length(total: int, max_positions: int) -> int:
    """The compiled decoder's cache length for a generation of `total` positions: the next power
    of two, at least DECODE_CACHE_MIN, at most the model's context. A step reads its whole cache,
    so a short generation should not pay for the full context (at 1,024 vs 256 positions a
    deepseek-v3-small step is ~30% slower), and a few lengths keep the number of graphs small."""
    length = max(DECODE_CACHE_MIN, 1 << max(total - 1, 0).bit_length())
    return min(length, max_positions)


MATVEC_MAX_ROWS = 4  # compiled decode: batches up to this size run their linears as matvec loops
MATMUL_MAX_ROWS = 4  # ... and matmuls with at most this many rows on the left (attention over the cache)
MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)


class MatvecLinear(torch.overrides.TorchFunctionMode):
    """Inside a compiled graph on the CPU, F.linear on at most MATVEC_MAX_ROWS rows as multiply-and-reduce,

        y[r, n] = sum_k x[r, k] W[n, k] (+ b[n]),

    which inductor turns into one vectorized loop that streams W once (and fuses with the ops
    around it), instead of an external BLAS matrix-vector call with its own threading and copies.
    Measured on this CPU in an interleaved A/B of the compiled deepseek-v3-small step: 2.50 -> 1.49
    ms at batch 1, 3.09 -> 2.18 at batch 2, 3.75 -> 3.28 at batch 4, but 5.57 -> 6.08 at batch 8
    (BLAS wins once W is reused by enough rows). Eagerly it would materialize rows x N x K.
    Likewise torch.matmul with at most MATMUL_MAX_ROWS rows on the left (the decode step's attention
    over its cache: G query heads per key head), y = sum_k a[..., m, k] b[..., k, n]: llama-small's
    batch-1 step 3-8% faster in interleaved A/Bs; with 8 rows (MLA's absorbed scores) BLAS was faster."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and args[0].numel() <= MATVEC_MAX_ROWS * args[0].shape[-1]:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            y = (x.unsqueeze(-2) * weight).sum(-1)
            return y if bias is None else y + bias
        if func in MATMULS and not kwargs and min(args[0].dim(), args[1].dim()) >= 2 \
                and args[0].shape[-2] <= MATMUL_MAX_ROWS:
            a, b = args  # (..., M, K) @ (..., K, N) with few rows M: a fused loop, no BLAS call
            return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)
        return func(*args, **kwargs)


DECODER_LOCK = threading.Lock()  # guards CompiledDecoder.in_use


class CompiledDecoder:
    """A static cache of `length` positions and a compiled one-token step over it.

    The step feeds per-row positions (a tensor) against the cache with a mask, so its shapes never
    change and `torch.compile` builds one graph per (model, batch, length); built once and kept on
    the model, it is reused by every later generation of that batch size and length bucket. On the CPU,
    up to MATVEC_MAX_ROWS rows, the step's linears (and its few-row matmuls) run as fused loops
    (`MatvecLinear`) and the graph has inductor's C++ wrapper; on a GPU neither.

    On the CPU the steps after a generation's first run the compiled graph without dynamo's frame
    evaluation (`DirectStep`); NANOSEEK_DIRECT_DECODE=0 keeps them on dynamo (guards skipped).

    On CUDA the compiled step is also captured as a CUDA graph once per generation and replayed
    (`CudaGraphStep`): a decode step of a small model is hundreds of kernel launches, and a replay
    is one. NANOSEEK_CUDA_GRAPHS=0 turns it off."""

    def __init__(self, model, batch: int, length: int):
        self.model, self.batch = model, batch
        self.cache = model.make_cache(batch, length)
        device = next(model.parameters()).device
        self.on_cpu = device.type == "cpu"  # GPUs keep their BLAS matvecs
        # the C++ wrapper is a CPU-overhead win; on CUDA it needs a CUDA toolkit (CUDA_HOME headers,
        # -lcuda), which a pip-only torch install lacks
        options = {"cpp_wrapper": True} if self.on_cpu else {}
        self.step = torch.compile(self._step, dynamic=False, options=options)
        direct = self.on_cpu and os.environ.get("NANOSEEK_DIRECT_DECODE", "1") != "0"
        self.direct = DirectStep(CompiledDecoder._step) if direct else None
        graphs = device.type == "cuda" and os.environ.get("NANOSEEK_CUDA_GRAPHS", "1") != "0"
        self.graph = CudaGraphStep(self.compiled_step) if graphs else None
        self.in_use = False

    def _step(self, token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with MatvecLinear() if self.on_cpu else nullcontext():  # acts on few-row linears and matmuls only
            return self.model(token, cache=self.cache, start=positions).logits[:, -1]

    def __call__(self, token: torch.Tensor, positions: torch.Tensor, guarded: bool = True) -> torch.Tensor:
        """One decode step: the logits (B, V) of `token` (B, 1) at `positions` (B,), its keys and values
        written to the cache. On CUDA a replay of the captured graph when there is one."""
        if self.graph is not None and self.graph.usable:
            return self.graph(token, positions, guarded)
        return self.compiled_step(token, positions, guarded)

    def compiled_step(self, token: torch.Tensor, positions: torch.Tensor, guarded: bool = True) -> torch.Tensor:
        """The compiled step. Within one generation nothing the graph depends on changes (shapes,
        dtypes, the model's modes and weights' identity), so after its first step, which checks the
        guards (and compiles if needed), the later steps skip guard evaluation (~0.2 ms a step): on
        the CPU they call the graph entry those guards chose directly (`DirectStep`), elsewhere (or
        when no entry qualifies) they run under dynamo's `skip_guard_eval_unsafe` stance."""
        if not guarded and self.direct is not None and self.direct.usable():
            return self.direct.fn(self, token, positions)
        if not guarded:
            try:
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    return self.step(token, positions)
            except RuntimeError as error:  # torch refuses to recompile without guards
                if "skip_guard_eval_unsafe" not in str(error):
                    raise
        with shared_function_recompile_limit():  # every decoder compiles the same function
            logits = self.step(token, positions)
        if self.direct is not None:
            self.direct.select(self, token, positions)
        return logits

    @classmethod
    def acquire(cls, model, batch: int, total: int) -> CompiledDecoder | None:
        """The model's decoder for this batch size, dtype, device and the length bucket of `total`
        positions, marked in use; None while another generation holds it (the caller then decodes
        eagerly)."""
        param = next(model.parameters())
        length = decode_cache_length(total, model.config.max_position_embeddings)
        key = (batch, param.dtype, param.device, length)
        with DECODER_LOCK:  # two threads must neither build nor take the same decoder
            decoders = model.__dict__.setdefault("_compiled_decoders", {})
            if key not in decoders:
                decoders[key] = cls(model, batch, length)
            decoder = decoders[key]
            if decoder.in_use:
                return None
            decoder.in_use = True
        if decoder.direct is not None:  # the generation's guarded first step selects again
            decoder.direct.clear()
        return decoder

    def release(self) -> None:
        self.in_use = False


class DirectStep:
    """The compiled decode step called as a plain function for the rest of a generation.

    Dynamo keeps each graph it compiled for a function as a cache entry: the entry's guards (shapes,
    dtypes, autocast and grad mode, the model's flags and weights) and its code, the function's
    bytecode rewritten to call the graph. After each generation's first, guarded step, `select`
    finds the entry whose guards pass for this decoder and its inputs; the later steps run that
    code directly, without dynamo's frame evaluation (~0.1 ms of a ~0.8 ms llama-small step on this
    CPU; the `skip_guard_eval_unsafe` stance still pays most of it), as long as the global state
    dynamo guards on (grad mode, autocast, default dtype, ...) is what it was at the selection (a
    C++ check of ~0.3 µs a step). Only for a step compiled as one graph (no resume functions: a
    step with a graph break keeps dynamo) under the default stance. The entry API is dynamo's
    internal one, so anything unexpected leaves `fn` None and the caller on the stance path."""

    def __init__(self, function):
        self.function = function  # CompiledDecoder._step, whose code object dynamo caches on
        self.fn = self.state = None

    def clear(self) -> None:
        self.fn = self.state = None

    def usable(self) -> bool:
        return self.fn is not None and self.state.check()

    def select(self, decoder, token: torch.Tensor, positions: torch.Tensor) -> None:
        """The cache entry valid for the step's arguments, called directly until the next `select`."""
        self.clear()
        try:
            from torch._C._dynamo.guards import GlobalStateGuard
            from torch._dynamo.eval_frame import _debug_get_cache_entry_list, _stance

            if _stance.stance != "default":  # e.g. force_eager: leave every call to dynamo
                return
            code = self.function.__code__
            f_locals = dict(zip(code.co_varnames[:code.co_argcount], (decoder, token, positions)))
            for entry in _debug_get_cache_entry_list(code):
                if calls_one_graph(entry.code) and entry.guard_manager.check(f_locals):
                    f = self.function
                    self.fn = types.FunctionType(entry.code, f.__globals__, f.__name__, f.__defaults__, f.__closure__)
                    self.state = GlobalStateGuard()
                    return
        except Exception:  # noqa: BLE001 - another torch's internals: keep the stance path
            self.clear()


def calls_one_graph(code: types.CodeType) -> bool:
    """Whether dynamo's rewritten bytecode calls exactly one compiled graph and resumes nowhere: its
    resume functions appear as `__resume_at_*` globals, or as nested code objects for a closure."""
    names = code.co_names
    return (sum(n.startswith("__compiled_fn") for n in names) == 1
            and not any(n.startswith("__resume_at") for n in names)
            and not any(isinstance(c, types.CodeType) for c in code.co_consts))


class CudaGraphStep:
    """A decode step captured as one CUDA graph and replayed: its inputs are copied into static
    buffers, the graph reruns every kernel of the step on the same memory (weights, the static
    cache), and the logits are copied out.

    Each generation captures its own graph at its first decode step (the guarded call): one
    ordinary compiled step (dynamo checks its guards, so a change of autocast, module flags or
    weights recompiles as it would without graphs), then a warm-up on a side stream and the
    capture run the step again on the same token and positions, which writes the same cache entries.
    The previous generation's graph and its output buffer are dropped before the next capture, so its
    private memory pool is freed. A capture that fails (an op that syncs with
    the host, say) warns once and leaves the compiled step to run as it is."""

    def __init__(self, step):
        self.step = step
        self.graph = self.logits = None
        self.usable = True

    def __call__(self, token: torch.Tensor, positions: torch.Tensor, guarded: bool) -> torch.Tensor:
        with torch.cuda.device(token.device):
            if guarded or self.graph is None:
                self.graph = self.logits = None
                logits = self.step(token, positions)
                self.capture(token, positions)
                return logits
            self.token.copy_(token)
            self.positions.copy_(positions)
            self.graph.replay()
            return self.logits.clone()  # the graph's buffer is overwritten by the next replay

    def capture(self, token: torch.Tensor, positions: torch.Tensor) -> None:
        self.token, self.positions = token.clone(), positions.clone()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step(self.token, self.positions)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.logits = self.step(self.token, self.positions)
        except RuntimeError as error:
            warnings.warn(f"CUDA graph capture of the decode step failed ({error}); decoding without it")
            self.usable = False
            return
        self.graph = graph


class TokenLoop:
    """The one prefill/decode/sample loop; iterate it to get the next ids (B,) step by step.

    Validation happens in the constructor; the model is switched to eval mode while the loop runs
    and put back in its previous mode when it ends (or is closed). Every step runs under
    `torch.inference_mode()`; nothing happens between steps, so a consumer can stream.
    """

    def __init__(self, model, input_ids: torch.Tensor, max_new_tokens: int,
                 options: SamplingOptions, stop_ids: Sequence[int] = (), compile: bool = False,
                 tokenizer=None, compile_prefill: bool = False):
        options.validate()
        self.compile, self.compile_prefill = compile, compile_prefill
        self.tokenizer = tokenizer  # when given, ids it does not know are never sampled
        check_lengths(input_ids.shape[1], max_new_tokens, model.config.max_position_embeddings)
        self.model = model
        self.input_ids = input_ids
        self.max_new_tokens = max_new_tokens
        self.options = options
        self.stop_ids = torch.tensor(list(stop_ids), dtype=torch.long, device=input_ids.device)
        self.generator = options.make_generator(input_ids.device)

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1]

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.max_new_tokens == 0:
            return
        was_training = self.model.training
        self.model.eval()
        try:
            self._start()
            for step in range(self.max_new_tokens):
                yield self._step(step)
                if self._all_finished():
                    return
        finally:
            self.model.train(was_training)
            if getattr(self, "decoder", None) is not None:
                self.decoder.release()

    @torch.inference_mode()
    def _start(self) -> None:
        batch, total = self.input_ids.shape[0], self.prompt_len + self.max_new_tokens
        self.decoder = CompiledDecoder.acquire(self.model, batch, total) if self.compile else None
        self.cache = self.decoder.cache if self.decoder else self.model.make_cache(batch, total)
        self.history = torch.zeros(batch, total, dtype=torch.long, device=self.input_ids.device)
        self.history[:, :self.prompt_len] = self.input_ids
        self.finished = torch.zeros(batch, dtype=torch.bool, device=self.input_ids.device)

    @torch.inference_mode()
    def _step(self, step: int) -> torch.Tensor:
        end = self.prompt_len + step  # position of the token sampled in this step
        if step == 0:
            run = compiled_prefill(self.model) if self.compile_prefill else partial(prefill, self.model)
            logits = run(self.input_ids, self.cache)
        elif self.decoder is not None:
            positions = torch.full((self.input_ids.shape[0],), end - 1, device=self.input_ids.device)
            # a fresh (B, 1) tensor: a view of the history would carry its length in its stride
            # (batch 1: .contiguous() keeps the view), and a new stride means a new graph
            token = self.history[:, end - 1:end].clone(memory_format=torch.contiguous_format)
            logits = self.decoder(token, positions, guarded=step == 1)
        else:
            logits = decode_step(self.model, self.history[:, end - 1:end], self.cache, end - 1)
        token = self._sample(logits, self.history[:, :end])
        if self.stop_ids.numel():
            token = torch.where(self.finished, self.stop_ids[0], token)
            self.finished |= torch.isin(token, self.stop_ids)
        self.history[:, end] = token
        return token

    def _sample(self, logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        o = self.options
        if self.tokenizer is not None:
            logits = mask_unknown_ids(logits, self.tokenizer)
        return sample_next(logits, o.temperature, o.top_k, o.top_p, self.generator,
                           recent_tokens=seen, repetition_penalty=o.repetition_penalty)

    def _all_finished(self) -> bool:
        return bool(self.stop_ids.numel()) and bool(self.finished.all())


def stop_id_list(eos_id: int | None, stop_ids: Sequence[int] | None) -> list[int]:
    """eos first (finished rows repeat the first id), then the other stop ids."""
    ids = [] if eos_id is None else [int(eos_id)]
    return ids + [int(i) for i in (stop_ids or ()) if int(i) not in ids]


# ---------------------------------------------------------------------------- token ids


def generate(model, input_ids: torch.Tensor | Sequence[int], max_new_tokens: int = 32,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float = 1.0, seed: int | None = None, eos_id: int | None = None,
             stop_ids: Sequence[int] | None = None, compile: bool = False,
             compile_prefill: bool = False) -> torch.Tensor:
    """The new token ids after `input_ids` (B, T) -> (B, n_new); a 1-D prompt gives (n_new,).

    Rows that emit `eos_id` (or one of `stop_ids`) repeat it afterwards; generation ends early
    once every row has finished. `compile=True` decodes with a compiled static-shape step
    (`CompiledDecoder`): the first call per batch size compiles (tens of seconds), later ones are
    ~4-6x faster per token on CPU at batch 1. `compile_prefill=True` also runs the prompt through
    `compiled_prefill` (one dynamic-shape graph; a long first compile, see there).
    """
    ids, single = as_batch(input_ids, model_device(model, torch.device("cpu")))
    options = SamplingOptions(temperature, top_k, top_p, repetition_penalty, seed)
    loop = TokenLoop(model, ids, max_new_tokens, options, stop_id_list(eos_id, stop_ids), compile=compile,
                     compile_prefill=compile_prefill)
    steps = list(loop)
    # stacking outside inference mode gives an ordinary tensor the caller may use freely
    new = torch.stack(steps, dim=1) if steps else ids.new_empty((ids.shape[0], 0))
    return new[0] if single else new


# ---------------------------------------------------------------------------- text


class StopStringFilter:
    """Passes text through, holding back what could still become the start of a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add `text`; return (text proven safe, whether a stop string was found)."""
        self.pending += text
        cut = self._first_stop()
        if cut is not None:
            safe, self.pending = self.pending[:cut], ""
            return safe, True
        keep = len(self.pending) - self.hold
        if keep <= 0:
            return "", False
        safe, self.pending = self.pending[:keep], self.pending[keep:]
        return safe, False

    def flush(self) -> str:
        rest, self.pending = self.pending, ""
        return rest

    def _first_stop(self) -> int | None:
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else None


def check_stop_strings(stop: Sequence[str] | str | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if any(not isinstance(s, str) or not s for s in stops):
        raise NanoseekError(f"stop strings must be non-empty strings, got {stops!r}")
    return stops


class TextStream:
    """Iterate to get the completion of `prompt` as text pieces, as tokens are produced.

    Never yields half a UTF-8 character, nor a stop string or anything after it. When iteration
    ends, `finish_reason` is "stop" (eos or a stop string) or "length" (max_new_tokens reached) and
    `completion_tokens` counts the tokens sampled (the eos or stop-completing token included).
    """

    def __init__(self, model, tokenizer, prompt: str, max_new_tokens: int = 128,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 repetition_penalty: float = 1.0, seed: int | None = None,
                 stop: Sequence[str] | None = None, compile: bool = False, compile_prefill: bool = False):
        self.tokenizer = tokenizer
        self.stops = check_stop_strings(stop)
        prompt_ids = tokenizer.encode(prompt)
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        ids, _ = as_batch(prompt_ids, model_device(model, torch.device("cpu")))
        options = SamplingOptions(temperature, top_k, top_p, repetition_penalty, seed)
        self._loop = TokenLoop(model, ids, max_new_tokens, options, stop_id_list(tokenizer.eos_id, None),
                               compile=compile, tokenizer=tokenizer, compile_prefill=compile_prefill)
        self._pieces = self._generate_pieces()

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop early; the model goes back to its previous train/eval mode."""
        self._pieces.close()

    def _generate_pieces(self) -> Iterator[str]:
        text = Detokenizer(self.tokenizer, self.stops)
        tokens = iter(self._loop)
        try:
            for token in tokens:
                self.completion_tokens += 1
                piece = text.push(int(token[0]))
                if piece:
                    yield piece
                if text.finish_reason:
                    break
        finally:
            tokens.close()
        rest = text.finish()
        self.finish_reason = text.finish_reason
        if rest:
            yield rest


class Detokenizer:
    """Token ids in, safe text out: never half a UTF-8 character, never a stop string.

    `push(id)` returns the text that became safe; once `finish_reason` is "stop" (eos or a stop
    string) further pushes return "". `finish()` returns what was held back and sets
    `finish_reason` to "length" if nothing stopped the sequence.
    """

    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop_filter = StopStringFilter(stops)
        self.finish_reason: str | None = None

    def push(self, token_id: int) -> str:
        if self.finish_reason:
            return ""
        if token_id == self.tokenizer.eos_id:
            self.finish_reason = "stop"
            return self._drain()
        safe, stopped = self.stop_filter.push(self.utf8.decode(self.tokenizer.decode_bytes([token_id])))
        if stopped:
            self.finish_reason = "stop"
        return safe

    def finish(self) -> str:
        if self.finish_reason == "stop" and not self.stop_filter.pending:
            return ""
        self.finish_reason = self.finish_reason or "length"
        return self._drain()

    def _drain(self) -> str:
        safe, stopped = self.stop_filter.push(self.utf8.decode(b"", final=True))
        return safe if stopped else safe + self.stop_filter.flush()


def complete(model, tokenizer, prompt: str, **options) -> tuple[str, str]:
    """The whole completion of `prompt` and its finish reason ("stop" or "length")."""
    stream = TextStream(model, tokenizer, prompt, **options)
    text = "".join(stream)
    return text, stream.finish_reason
