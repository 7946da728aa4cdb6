"""Benchmarks: `nanoseek bench WHAT [options]`, one JSON object per line on stdout.

WHAT is a key of `BENCHES` ("train", "serve" in bench_serve.py); each entry adds its options to an argparse
parser and runs. New benchmarks (prefill, decode, attention, ...) are one more function each.

train: nanoseek's `Transformer` built from a GPT-2 preset against a plain nanoGPT-style GPT
(`benchmarks/reference_gpt.py`) with the same shapes: vocabulary 65 (char-level Shakespeare), the
preset's layers, heads and width, block size = seq_len, biases everywhere, tied head. Both train
on the same batches with AdamW (lr 1e-3); a step is
    forward + backward + clip_grad_norm(1.0) + optimizer.step + zero_grad.
The implementations alternate in rounds (A B A B ...) so that drift of the machine (other load,
clock changes) hits both alike; the first round of each begins with `warmup` untimed steps.

Reported per implementation:
    tokens_per_s  median over rounds of batch * seq_len / (mean seconds per step in the round)
    seconds       median over rounds of the mean seconds per step
    mfu           tokens_per_s * flops_per_token / peak, where flops_per_token is nanoseek's
                  `model.flops_per_token(seq_len)` (6 N + 12 L H d_head T) for BOTH models: their
                  shapes are identical, so is their arithmetic. The peak is a measured torch.mm rate
                  (`measure_matmul_peak`) in the dtype of the implementation's matmuls, at the
                  same thread count: an attainable peak, not the datasheet one. CPUs without
                  native bf16 matmuls (no AVX512-BF16 / AMX) run bf16 through a slow fallback whose
                  rate falls with the size, so a bfloat16 MFU there can exceed 1: read it as "relative
                  to the measured bf16 mm", and compare tokens_per_s.
    peak_rss_mib  the highest anonymous resident memory (resident - shared pages of
                  /proc/self/statm, sampled every ~5 ms by a background thread) during the
                  implementation's first round (build + warmup + timed steps), minus the same figure
                  just before its model was built. Weights, gradients, optimizer moments,
                  activations, allocator slack; not torch's code pages (file-backed) and not its
                  one-off lazy setup (each implementation runs one untimed step of a throwaway model
                  first). Freed heap goes back to the OS (glibc malloc_trim) before each baseline.
                  Both models live in one process, so it is approximate; it is not getrusage's
                  ru_maxrss, which is process-wide and never decreases.
    peak_heap_mib the highest bytes in use from the C allocator (glibc mallinfo2) over the same
                  window, minus its value at the start: the live tensors without the freed memory
                  glibc keeps resident (which differs from run to run with the order of frees; here
                  it was 170-240 MiB of the peak RSS of both implementations). None without glibc.
    peak_device_mib  with --device cuda: the CUDA allocator's peak over the same window minus its
                  allocation at the start (None on a CPU)
    loss          the training loss after the last step (both models should learn alike)
and a last line {"impl": "ratio", "nanoseek_over_reference": tokens/s of nanoseek / reference}.

    >>> run_bench(["train", "--preset", "gpt2-tiny", "--steps", "2"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from .errors import NanoseekError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TRAIN_IMPLS = ("nanoseek", "nanoseek-compiled", "reference", "hf")
VOCAB_SIZE = 65  # tiny Shakespeare's characters
REFERENCE_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "reference_gpt.py"
CORPUS_PATH = Path(__file__).resolve().parent / "data" / "tinyshakespeare.txt"
MIB = 1 << 20


# ------------------------------------------------------------------------------------ machine


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def current_rss() -> int:
    """Anonymous resident memory of this process now, in bytes (0 where /proc is missing).

    /proc/self/statm's resident minus shared pages: heap and tensors, without file-backed pages
    (the parts of libtorch's code that a first call happens to map in)."""
    try:
        with open("/proc/self/statm") as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc malloc_trim) so RSS baselines are clean."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _load_mallinfo2():
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _load_mallinfo2()


def heap_in_use() -> int | None:
    """Bytes the C allocator has handed out and not had back (glibc mallinfo2: in-use heap chunks
    plus mmapped blocks), or None without glibc >= 2.33. Unlike RSS it excludes freed memory the
    allocator keeps (fragmentation, trim thresholds): the live tensors' footprint."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd


class RssSampler:
    """Samples the current RSS (and the C heap in use) in a background thread; `peak` and
    `heap_peak` are the highest values seen (`heap_peak` None where `heap_in_use` is)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self.heap_base = self.heap_peak = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "RssSampler":
        self.peak = current_rss()
        self.heap_base = self.heap_peak = heap_in_use()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        self.peak = max(self.peak, current_rss())
        if self.heap_peak is not None:
            self.heap_peak = max(self.heap_peak, heap_in_use())

    def _run(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        return False


@contextlib.contextmanager
def torch_threads(threads: int):
    """Run with `threads` intra-op threads (0 = leave torch's setting), restoring it after."""
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_matmul_peak(dtype: str | torch.dtype = "float32", threads: int = 0,
                        seconds: float = 1.5, device: torch.device | str = "cpu") -> float:
    """Best torch.mm rate in GFLOP/s over square n x n products, n in 1024..2048 on a CPU
    (4096..16384 on a GPU, timed after a device synchronize).

    Each size gets an equal share of `seconds`; a size whose single product would overrun the
    remaining time is skipped (slow dtypes then measure at 1024 only). 2 n^3 FLOPs per product."""
    from .device import synchronize

    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    device = torch.device(device)
    sizes = (4096, 8192, 16384) if device.type == "cuda" else (1024, 1536, 2048)
    best = 0.0
    gen = torch.Generator(device=device).manual_seed(0)  # drawn where they are used (16384^2 on a GPU)
    with torch_threads(threads), torch.no_grad():
        deadline = time.perf_counter() + seconds
        for i, n in enumerate(sizes):
            a = torch.randn(n, n, generator=gen, device=device).to(dt)
            b = torch.randn(n, n, generator=gen, device=device).to(dt)
            out = torch.empty(n, n, dtype=dt, device=device)
            share_end = time.perf_counter() + (deadline - time.perf_counter()) / (len(sizes) - i)
            last = None
            if device.type == "cuda":  # a GPU's first product of a shape picks its kernel
                torch.mm(a, b, out=out)
                synchronize(device)
            while True:
                t0 = time.perf_counter()
                torch.mm(a, b, out=out)
                synchronize(device)
                last = time.perf_counter() - t0
                best = max(best, 2 * n ** 3 / last / 1e9)
                if time.perf_counter() + last > share_end:
                    break
            del a, b, out
            # the next size costs ~(n'/n)^3 times more; stop when it cannot fit once
            if i + 1 < len(sizes) and time.perf_counter() + last * (sizes[i + 1] / n) ** 3 > deadline:
                break
    return best


# ------------------------------------------------------------------------------------ train


def load_reference():
    """The module `benchmarks/reference_gpt.py` of the source tree, imported by path."""
    if not REFERENCE_PATH.is_file():
        raise NanoseekError(
            f"the reference model {REFERENCE_PATH} is missing: `nanoseek bench train` needs the source "
            "tree (pip install -e .), or use --peers none to time nanoseek alone"
        )
    name = "nanoseek_reference_gpt"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REFERENCE_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _check_gpt2_shape(preset: str, cfg) -> None:
    """The reference is a GPT-2; comparing it with another architecture would mislead."""
    wanted = dict(position="learned", attention="mha", ffn="gelu", norm="layernorm", norm_position="pre",
                  tie_word_embeddings=True, attention_bias=True, mlp_bias=True, final_norm=True,
                  embedding_scale=False, intermediate_size=4 * cfg.hidden_size, head_dim=None)
    wrong = [f"{k}={getattr(cfg, k)!r}" for k, v in wanted.items() if getattr(cfg, k) != v]
    if wrong:
        raise NanoseekError(
            f"preset {preset!r} is not GPT-2-shaped ({', '.join(wrong)}), so the reference GPT cannot "
            "match it; use a gpt2-* preset or --peers none"
        )


def make_batches(n: int, batch: int, seq_len: int, data: str, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` (input, target) batches from a fixed generator, shared by every implementation.

    data="shakespeare": random windows of the bundled corpus, one token per character (65 of them),
    so that the loss falls as it would in training; data="random": uniform random tokens."""
    gen = torch.Generator().manual_seed(seed)
    if data == "shakespeare":
        text = CORPUS_PATH.read_text(encoding="utf-8")
        chars = sorted(set(text))
        if len(chars) != VOCAB_SIZE:
            raise NanoseekError(f"{CORPUS_PATH} has {len(chars)} characters, expected {VOCAB_SIZE}")
        lookup = torch.zeros(128, dtype=torch.long)
        lookup[torch.tensor([ord(c) for c in chars])] = torch.arange(len(chars))
        tokens = lookup[torch.frombuffer(bytearray(text.encode("ascii")), dtype=torch.uint8).long()]
        starts = torch.randint(0, len(tokens) - seq_len - 1, (n, batch), generator=gen)
        windows = [torch.stack([tokens[s:s + seq_len + 1] for s in row.tolist()]) for row in starts]
    elif data == "random":
        windows = list(torch.randint(0, VOCAB_SIZE, (n, batch, seq_len + 1), generator=gen))
    else:
        raise NanoseekError(f"data={data!r} is not valid; choose one of: shakespeare, random")
    return [(w[:, :-1].contiguous(), w[:, 1:].contiguous()) for w in windows]


class TrainRunner:
    """One implementation: builds lazily, then runs steps on the shared batches."""

    def __init__(self, impl: str, build: Callable[[], tuple[torch.nn.Module, torch.optim.Optimizer, Callable]],
                 dtype: str, device: torch.device | str = "cpu"):
        self.impl, self._build, self.dtype = impl, build, dtype
        self.device = torch.device(device)
        self.model = self.optimizer = self.loss_fn = None
        self.step_index = 0
        self.round_seconds: list[float] = []  # mean seconds per timed step, one per round
        self.loss = float("nan")
        self.peak_rss = 0
        self.peak_heap: int | None = None
        self.peak_device: int | None = None  # bytes, on a GPU

    def autocast(self):
        from .device import autocast

        return autocast(self.device, self.dtype)

    def step(self, batches) -> torch.Tensor:
        x, y = batches[self.step_index % len(batches)]
        self.step_index += 1
        with self.autocast():
            loss = self.loss_fn(self.model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if hasattr(self.model, "after_optimizer_step"):  # MoE bias balancing, as in training
            self.model.after_optimizer_step()
        return loss

    def prime(self, batches) -> None:
        """One step of a throwaway model, so that torch's one-off lazy setup (autograd engine,
        kernel caches, thread pools) is not charged to the memory of whichever impl runs first."""
        self.model, self.optimizer, self.loss_fn = self._build()
        self.step(batches)
        self.model = self.optimizer = self.loss_fn = None
        self.step_index = 0
        gc.collect()

    def run_round(self, batches, steps: int, warmup: int) -> None:
        from .device import DevicePeak, synchronize

        first = self.model is None
        sampler = RssSampler() if first else contextlib.nullcontext()
        window = DevicePeak(self.device) if first else contextlib.nullcontext()
        if first:
            release_free_memory()
            base = current_rss()
        with sampler, window:
            if first:
                self.model, self.optimizer, self.loss_fn = self._build()
                self.model.train()
                for _ in range(warmup):
                    self.step(batches)
            synchronize(self.device)
            t0 = time.perf_counter()
            for _ in range(steps):
                loss = self.step(batches)
            synchronize(self.device)
            elapsed = time.perf_counter() - t0
        if first:
            self.peak_rss = sampler.peak - base
            self.peak_heap = None if sampler.heap_peak is None else sampler.heap_peak - sampler.heap_base
            self.peak_device = window.peak
        self.round_seconds.append(elapsed / steps)
        self.loss = loss.item()


def _build_nanoseek(cfg, lr: float, seed: int, device: torch.device | str = "cpu", compiled: bool = False):
    from .config import OptimConfig
    from .model import Transformer
    from .train.loop import maybe_compile
    from .train.optim import make_optimizer

    def build():
        torch.manual_seed(seed)
        model = Transformer(cfg).to(device)
        optimizer = make_optimizer(model, OptimConfig(lr=lr))
        return maybe_compile(model, compiled), optimizer, training_loss  # as train.compile does

    return build


def training_loss(model, x, y) -> torch.Tensor:
    """The loss a nanoseek training step backpropagates: LM loss + MTP loss + balance loss."""
    out = model(x, y, return_logits=False)  # as the trainer runs it: head + loss fused
    return out.loss + sum(v for v in out.aux.values() if v.requires_grad)


def _build_reference(module, cfg, lr: float, seed: int, device: torch.device | str = "cpu"):
    gpt_cfg = module.GPTConfig(block_size=cfg.max_position_embeddings, vocab_size=cfg.vocab_size,
                               n_layer=cfg.num_hidden_layers, n_head=cfg.num_attention_heads,
                               n_embd=cfg.hidden_size, dropout=0.0, bias=True)

    def build():
        torch.manual_seed(seed)
        model = module.GPT(gpt_cfg).to(device)
        optimizer = model.configure_optimizers(weight_decay=0.1, lr=lr, betas=(0.9, 0.95))
        return model, optimizer, lambda m, x, y: m(x, y)[1]

    return build


def _build_hf(cfg, lr: float, seed: int, device: torch.device | str = "cpu"):
    """transformers' model of the same architecture, initialized with nanoseek's weights for `seed`."""
    import tempfile

    try:
        import transformers
    except ImportError:
        raise NanoseekError("the hf peer needs transformers (pip install 'nanoseek[bench]')") from None
    from .model import Transformer

    def build():
        torch.manual_seed(seed)
        with tempfile.TemporaryDirectory(prefix="nanoseek-bench-hf-") as tmp:
            Transformer(cfg).save_pretrained(tmp, format="hf")
            transformers.logging.set_verbosity_error()
            model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(device)
        decay = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                      lr=lr, betas=(0.9, 0.95))
        return model, optimizer, hf_training_loss

    return build


def hf_training_loss(model, x, y) -> torch.Tensor:
    logits = model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def bench_train(preset: str = "gpt2-small", impls: tuple[str, ...] = ("nanoseek", "reference"), seq_len: int = 64,
                batch: int = 12, dtype: str = "float32", ref_dtype: str = "float32", steps: int = 20,
                warmup: int = 5, rounds: int = 3, threads: int = 2, peak_seconds: float = 1.5,
                data: str = "shakespeare", lr: float = 1e-3, seed: int = 1337, device: str = "cpu") -> list[dict]:
    """Train nanoseek and its peers on the same batches; one result dict per impl, then the ratio.

    `dtype` is nanoseek's (bfloat16 = autocast), `ref_dtype` the peers'; `device` is cpu, cuda,
    cuda:N or auto (on a GPU the timers synchronize and peak_device_mib is the CUDA allocator's peak)."""
    from .config import ModelConfig
    from .device import resolve_device

    impls = tuple(impls)
    for impl in impls:
        if impl not in TRAIN_IMPLS:
            raise NanoseekError(f"unknown implementation {impl!r}; choose from: {', '.join(TRAIN_IMPLS)}")
    if not impls or len(set(impls)) != len(impls):
        raise NanoseekError(f"impls={impls!r}: name each implementation once")
    for name, value in (("dtype", dtype), ("ref_dtype", ref_dtype)):
        if value not in DTYPES:
            raise NanoseekError(f"{name}={value!r} is not valid; choose one of: {', '.join(DTYPES)}")
    for name, value, low in (("seq_len", seq_len, 1), ("batch", batch, 1), ("steps", steps, 1),
                             ("warmup", warmup, 0), ("rounds", rounds, 1), ("threads", threads, 0)):
        if value < low:
            raise NanoseekError(f"{name}={value} must be >= {low}")

    where = resolve_device(device, where="--device")
    cfg = ModelConfig.from_preset(preset).replace(vocab_size=VOCAB_SIZE, max_position_embeddings=seq_len)
    if "hf" in impls:  # transformers trains no MTP module: compare the same work
        cfg = cfg.replace(num_nextn_predict_layers=0)
    builders = {}
    if "reference" in impls:
        _check_gpt2_shape(preset, cfg)
        builders["reference"] = (_build_reference(load_reference(), cfg, lr, seed, where), ref_dtype)
    if "nanoseek" in impls:
        builders["nanoseek"] = (_build_nanoseek(cfg, lr, seed, where), dtype)
    if "nanoseek-compiled" in impls:
        builders["nanoseek-compiled"] = (_build_nanoseek(cfg, lr, seed, where, compiled=True), dtype)
    if "hf" in impls:
        builders["hf"] = (_build_hf(cfg, lr, seed, where), ref_dtype)

    with torch_threads(threads):
        n_threads = torch.get_num_threads()
        peaks = {dt: measure_matmul_peak(dt, n_threads, peak_seconds, where)
                 for dt in sorted({d for _, d in builders.values()})}
        batches = [(x.to(where), y.to(where)) for x, y in make_batches(warmup + rounds * steps, batch, seq_len, data, seed)]
        runners = [TrainRunner(impl, *builders[impl], where) for impl in impls]
        for runner in runners:
            runner.prime(batches)
        for r in range(rounds):
            for runner in runners:
                runner.run_round(batches, steps, warmup if r == 0 else 0)

    flops = train_flops_per_token(cfg, seq_len)
    machine = {"threads": n_threads, "torch": torch.__version__, "cpu": cpu_name(), **device_info(where)}
    results = []
    for runner in runners:
        per_round = [batch * seq_len / s for s in runner.round_seconds]
        tps = statistics.median(per_round)
        peak = peaks[runner.dtype]
        results.append({
            "bench": "train", "impl": runner.impl, "preset": preset, "dtype": runner.dtype,
            "seq_len": seq_len, "batch": batch, "tokens_per_s": round(tps, 1),
            "seconds": statistics.median(runner.round_seconds),
            "mfu": tps * flops / (peak * 1e9) if peak > 0 else None,
            "peak_rss_mib": round(runner.peak_rss / MIB, 1),
            "peak_heap_mib": None if runner.peak_heap is None else round(runner.peak_heap / MIB, 1),
            "peak_device_mib": None if runner.peak_device is None else round(runner.peak_device / MIB, 1),
            "loss": runner.loss, **machine,
            "steps": steps, "warmup": warmup, "rounds": rounds, "data": data,
            "flops_per_token": flops, "peak_gflops": round(peak, 1),
            "tokens_per_s_rounds": [round(t, 1) for t in per_round],
        })
    by_impl = {r["impl"]: r for r in results}
    if "nanoseek" in by_impl and "hf" in by_impl:
        ns, hf = by_impl["nanoseek"], by_impl["hf"]
        results.append({"bench": "train", "impl": "ratio", "preset": preset, "seq_len": seq_len, "batch": batch,
                        "nanoseek_over_hf": ns["tokens_per_s"] / hf["tokens_per_s"],
                        "peak_rss_nanoseek_over_hf": (ns["peak_rss_mib"] / hf["peak_rss_mib"]
                                                      if hf["peak_rss_mib"] > 0 else None),
                        "peak_heap_nanoseek_over_hf": (ns["peak_heap_mib"] / hf["peak_heap_mib"]
                                                       if hf["peak_heap_mib"] else None),
                        "peak_device_nanoseek_over_hf": (ns["peak_device_mib"] / hf["peak_device_mib"]
                                                         if hf["peak_device_mib"] else None), **machine})
    if "nanoseek-compiled" in by_impl:
        fast = by_impl["nanoseek-compiled"]
        results.append({"bench": "train", "impl": "ratio", "preset": preset, "seq_len": seq_len, "batch": batch,
                        **{f"nanoseek-compiled_over_{impl}": fast["tokens_per_s"] / by_impl[impl]["tokens_per_s"]
                           for impl in ("nanoseek", "hf", "reference") if impl in by_impl}, **machine})
    if "nanoseek" in by_impl and "reference" in by_impl:
        ns, ref = by_impl["nanoseek"], by_impl["reference"]
        results.append({
            "bench": "train", "impl": "ratio", "preset": preset, "dtype": ns["dtype"],
            "ref_dtype": ref["dtype"], "seq_len": seq_len, "batch": batch,
            "nanoseek_over_reference": ns["tokens_per_s"] / ref["tokens_per_s"],
            "peak_rss_nanoseek_over_reference": (ns["peak_rss_mib"] / ref["peak_rss_mib"]
                                                 if ref["peak_rss_mib"] > 0 else None),
            "peak_heap_nanoseek_over_reference": (ns["peak_heap_mib"] / ref["peak_heap_mib"]
                                                  if ref["peak_heap_mib"] else None),
            **machine,
        })
    return results


def train_flops_per_token(cfg, seq_len: int) -> float:
    """nanoseek's `model.flops_per_token(seq_len)`, for every implementation (identical shapes).

    Built on the meta device, so it costs no memory and works when nanoseek is not benchmarked."""
    from .model import Transformer

    with torch.device("meta"):
        return Transformer(cfg).flops_per_token(seq_len)


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    from .device import add_device_arg

    parser.add_argument("--preset", default="gpt2-small", help="a GPT-2-shaped preset (default gpt2-small)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="nanoseek's compute dtype (bfloat16 = autocast on --device)")
    parser.add_argument("--ref-dtype", choices=tuple(DTYPES), default="float32",
                        help="the peers' compute dtype")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before the first round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per implementation")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0 = torch's default)")
    parser.add_argument("--peers", default="reference",
                        help="comma-separated: reference (GPT-2 presets), hf (transformers, DeepSeek/Llama presets), "
                             "or none")
    parser.add_argument("--data", choices=("shakespeare", "random"), default="shakespeare")
    parser.add_argument("--compile", action="store_true",
                        help="also time nanoseek under torch.compile (train.compile=true), as nanoseek-compiled")
    parser.add_argument("--peak-seconds", type=float, default=1.5,
                        help="seconds spent measuring the matmul peak per dtype")
    add_device_arg(parser, default="cpu")


def device_info(device: torch.device) -> dict:
    """The device fields of a result's machine record."""
    info = {"device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _run_train(args: argparse.Namespace) -> list[dict]:
    peers = [] if args.peers == "none" else [p for p in args.peers.split(",") if p]
    for peer in peers:
        if peer not in ("reference", "hf"):
            raise NanoseekError(f"--peers: unknown peer {peer!r}; choose from reference, hf, none")
    impls = ("nanoseek", *(["nanoseek-compiled"] if args.compile else []), *peers)
    return bench_train(args.preset, impls, seq_len=args.seq_len, batch=args.batch, dtype=args.dtype,
                       ref_dtype=args.ref_dtype, steps=args.steps, warmup=args.warmup, rounds=args.rounds,
                       threads=args.threads, peak_seconds=args.peak_seconds, data=args.data, device=args.device)


# WHAT -> (help, add the options, run -> result dicts)
BENCHES: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], list]]] = {
    "train": ("training throughput, nanoseek vs a nanoGPT-style reference", _add_train_args, _run_train),
}


def _register_serve() -> None:
    from .bench_serve import add_serve_args, run_serve

    BENCHES["serve"] = ("concurrent streaming clients against `nanoseek serve`", add_serve_args, run_serve)


def _register_attention() -> None:
    from .bench_attention import add_attention_args, run_attention

    BENCHES["attention"] = ("dense causal SDPA vs each sparse attention kind, by sequence length",
                            add_attention_args, run_attention)


def _register_inference() -> None:
    from .bench_infer import add_decode_args, add_prefill_args, run_decode, run_prefill

    BENCHES["prefill"] = ("prompt prefill tokens/s, TTFT and MFU, nanoseek vs transformers", add_prefill_args,
                          run_prefill)
    BENCHES["decode"] = ("KV-cache decode tokens/s and memory-bandwidth use, nanoseek vs transformers",
                         add_decode_args, run_decode)


_register_serve()
_register_attention()
_register_inference()


def _usage() -> str:
    lines = ["usage: nanoseek bench WHAT [options]   (WHAT --help for its options)", "", "WHAT:"]
    lines += [f"  {name:10s} {help_}" for name, (help_, _, _) in BENCHES.items()]
    return "\n".join(lines)


def run_bench(argv: list[str]) -> int:
    """`nanoseek bench WHAT ...`: print one JSON line per result to stdout, flushed; return 0."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    what, rest = argv[0], argv[1:]
    if what not in BENCHES:
        raise NanoseekError(f"unknown benchmark {what!r}; choose one of: {', '.join(BENCHES)}")
    help_, add_args, run = BENCHES[what]
    parser = argparse.ArgumentParser(prog=f"nanoseek bench {what}", description=help_)
    add_args(parser)
    args = parser.parse_args(rest)
    for result in run(args):
        print(json.dumps(result), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Script entry (benchmarks/bench_train.py): bench errors print as one line, exit status 2."""
    try:
        return run_bench(sys.argv[1:] if argv is None else argv)
    except NanoseekError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
