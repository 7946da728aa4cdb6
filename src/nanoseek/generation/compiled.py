"""Compiled decoding: a static-shape decode step under torch.compile, CUDA-graph replay of it, and
the compiled prefill.

`CompiledDecoder` keeps a static cache of a power-of-two length bucket (`decode_cache_length`) and
compiles one-token steps over it (`torch.compile(dynamic=False)`), one graph per (model, batch,
length); `TokenLoop(compile=True)` decodes with it. `DecodeOptions` says which fast paths a
generation uses on top (both on by default, each tested equal to eager decoding):

    direct_calls  on the CPU, after a generation's first (guarded) step, call dynamo's graph entry
                  as a plain function (`direct.DirectStep`, which uses dynamo's private cache API)
    cuda_graphs   on CUDA, capture the compiled step once per generation and replay it (`CudaGraphStep`)

`compiled_prefill` runs the prompt through one dynamic-shape graph (opt-in: its compile is long).
"""

from __future__ import annotations

import threading
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanoseek.generation.direct import DirectStep
from nanoseek.generation.steps import prefill


@dataclass(frozen=True)
class DecodeOptions:
    """The compiled decoder's fast paths (see the module docstring); the defaults are the fast ones."""

    direct_calls: bool = True
    cuda_graphs: bool = True


RECOMPILE_LIMIT = 64  # graphs of one compiled function shared by every model (batch sizes x lengths x models)


def shared_function_recompile_limit():
    """Raise dynamo's limit of 8 graphs per function for the prefill and decode-step functions, which
    every model, batch size and length bucket compiles (past the limit dynamo would run them eager)."""
    return torch._dynamo.config.patch(recompile_limit=max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit))


class ModelSteps(dict):
    """The compiled steps of one model, kept on it (`model_steps`): they close over the model, so a
    copy of it (copy.deepcopy, pickle) starts with none, since a copied step would run the original's
    weights."""

    def __deepcopy__(self, memo):
        return type(self)()

    def __reduce__(self):
        return (type(self), ())


def model_steps(model) -> ModelSteps:
    """{"prefill": compiled prefill, "decoders": {(batch, dtype, device, length): CompiledDecoder}}."""
    steps = model.__dict__.get("_compiled_steps")
    if steps is None:
        steps = model.__dict__["_compiled_steps"] = ModelSteps()
    return steps


def compiled_decoders(model) -> dict:
    """The model's compiled decoders by (batch, dtype, device, cache length)."""
    return model_steps(model).setdefault("decoders", {})


def compiled_prefill(model):
    """`prefill` for this model under torch.compile with dynamic shapes (built at first use, kept on
    the model): a prompt of another length reuses the graph (tested); batch 1, one-token prompts, a
    batch equal to another dimension of the first call (dynamo's duck sizing) or the MoE's few-token
    path may compile graphs of their own. Opt-in (`generate(..., compile_prefill=True)`): the first
    compile is long, so it pays off for long or many prompts (figures in benchmarks/RESULTS.md)."""
    steps = model_steps(model)
    fn = steps.get("prefill")
    if fn is None:
        fn = steps["prefill"] = torch.compile(lambda ids, cache: prefill(model, ids, cache), dynamic=True)

    def run(ids: torch.Tensor, cache) -> torch.Tensor:
        # a fresh contiguous copy: a sliced prompt's stride, or a tensor made outside inference mode,
        # would each fail a guard and compile a new graph
        with shared_function_recompile_limit():
            return fn(ids.clone(memory_format=torch.contiguous_format), cache)

    return run


DECODE_CACHE_MIN = 256  # the shortest static cache a compiled decoder keeps (positions)


def decode_cache_length(total: int, max_positions: int) -> int:
    """The compiled decoder's cache length for a generation of `total` positions: the next power
    of two, at least DECODE_CACHE_MIN, at most the model's context. A step reads its whole cache,
    so a short generation should not pay for the full context, and a few lengths keep the number
    of graphs small."""
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
    Past a few rows BLAS wins (W is reused by enough rows), hence the limit; eagerly it would
    materialize rows x N x K. Likewise torch.matmul with at most MATMUL_MAX_ROWS rows on the left
    (the decode step's attention over its cache: G query heads per key head),
    y = sum_k a[..., m, k] b[..., k, n]. The A/B measurements are in benchmarks/RESULTS.md."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and args[0].numel() <= MATVEC_MAX_ROWS * args[0].shape[-1]:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            y = (x.unsqueeze(-2) * weight).sum(-1)
            return y if bias is None else y + bias
        if (
            func in MATMULS
            and not kwargs
            and min(args[0].dim(), args[1].dim()) >= 2
            and args[0].shape[-2] <= MATMUL_MAX_ROWS
        ):
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
    evaluation (`DirectStep`); `DecodeOptions(direct_calls=False)` keeps them on dynamo (guards skipped).

    On CUDA the compiled step is also captured as a CUDA graph once per generation and replayed
    (`CudaGraphStep`): a decode step of a small model is hundreds of kernel launches, and a replay
    is one. `DecodeOptions(cuda_graphs=False)` turns it off.

    The generation that holds the decoder sets its options with `configure` (see `acquire`)."""

    def __init__(self, model, batch: int, length: int, options: DecodeOptions | None = None, cache: list | None = None):
        self.model, self.batch = model, batch
        # `cache`: step over caches the caller owns (the server's rows 0..batch-1, `length` positions)
        self.cache = model.make_cache(batch, length) if cache is None else cache
        device = next(model.parameters()).device
        self.on_cpu = device.type == "cpu"  # GPUs keep their BLAS matvecs
        # the C++ wrapper is a CPU-overhead win; on CUDA it needs a CUDA toolkit (CUDA_HOME headers,
        # -lcuda), which a pip-only torch install lacks
        inductor = {"cpp_wrapper": True} if self.on_cpu else {}
        self.step = torch.compile(self._step, dynamic=False, options=inductor)
        self.on_cuda = device.type == "cuda"
        self.direct: DirectStep | None = None
        self.graph: CudaGraphStep | None = None
        self.configure(options or DecodeOptions())
        self.in_use = False

    def configure(self, options: DecodeOptions) -> None:
        """Use `options` for the next steps: `direct` exists only with direct calls on the CPU, `graph`
        only with CUDA graphs on CUDA (dropping a graph frees its memory pool)."""
        self.options = options
        if not (self.on_cpu and options.direct_calls):
            self.direct = None
        elif self.direct is None:
            self.direct = DirectStep(CompiledDecoder._step)
        if not (self.on_cuda and options.cuda_graphs):
            self.graph = None
        elif self.graph is None:
            self.graph = CudaGraphStep(self.compiled_step)

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
        guards (and compiles if needed), the later steps skip guard evaluation: on
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
        eagerly). The caller sets its options with `configure`."""
        param = next(model.parameters())
        length = decode_cache_length(total, model.config.max_position_embeddings)
        key = (batch, param.dtype, param.device, length)
        with DECODER_LOCK:  # two threads must neither build nor take the same decoder
            decoders = compiled_decoders(model)
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
            warnings.warn(f"CUDA graph capture of the decode step failed ({error}); decoding without it", stacklevel=2)
            self.usable = False
            return
        self.graph = graph
