"""`nanoseek bench train`: training throughput against peer implementations.

nanoseek's `Transformer` built from a GPT-2 preset against a plain nanoGPT-style GPT
(`bench/reference_gpt.py`) with the same shapes: vocabulary 65 (char-level Shakespeare), the
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
                  glibc keeps resident (which differs from run to run with the order of frees and can be
                  a large part of the peak RSS). None without glibc.
    peak_device_mib  with --device cuda: the CUDA allocator's peak over the same window minus its
                  allocation at the start (None on a CPU)
    loss          the training loss after the last step (both models should learn alike)
and a last line {"impl": "ratio", "nanoseek_over_reference": tokens/s of nanoseek / reference}.

"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch

import nanoseek.bench.reference_gpt as reference_gpt
from nanoseek.bench.common import (
    DTYPES,
    MIB,
    RssSampler,
    cpu_name,
    current_rss,
    device_info,
    measure_matmul_peak,
    release_free_memory,
    torch_threads,
)
from nanoseek.config import ModelConfig, OptimConfig
from nanoseek.config.presets import canonical_name
from nanoseek.data import BUNDLED_CORPUS
from nanoseek.device import DevicePeak, add_device_arg, autocast, bf16_support, resolve_device, synchronize
from nanoseek.errors import NanoseekError
from nanoseek.model import Transformer
from nanoseek.train.loop import maybe_compile
from nanoseek.train.optim import make_optimizer

TRAIN_IMPLS = ("nanoseek", "nanoseek-compiled", "nanoseek-fp32", "reference", "hf")
VOCAB_SIZE = 65  # tiny Shakespeare's characters


def _check_gpt2_shape(preset: str, cfg) -> None:
    """The reference is a GPT-2; comparing it with another architecture would mislead."""
    wanted = dict(
        position="learned",
        attention="mha",
        ffn="gelu",
        norm="layernorm",
        norm_position="pre",
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        final_norm=True,
        embedding_scale=False,
        intermediate_size=4 * cfg.hidden_size,
        head_dim=None,
    )
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
        text = BUNDLED_CORPUS.read_text(encoding="utf-8")
        chars = sorted(set(text))
        if len(chars) != VOCAB_SIZE:
            raise NanoseekError(f"{BUNDLED_CORPUS} has {len(chars)} characters, expected {VOCAB_SIZE}")
        lookup = torch.zeros(128, dtype=torch.long)
        lookup[torch.tensor([ord(c) for c in chars])] = torch.arange(len(chars))
        tokens = lookup[torch.frombuffer(bytearray(text.encode("ascii")), dtype=torch.uint8).long()]
        starts = torch.randint(0, len(tokens) - seq_len - 1, (n, batch), generator=gen)
        windows = [torch.stack([tokens[s : s + seq_len + 1] for s in row.tolist()]) for row in starts]
    elif data == "random":
        windows = list(torch.randint(0, VOCAB_SIZE, (n, batch, seq_len + 1), generator=gen))
    else:
        raise NanoseekError(f"data={data!r} is not valid; choose one of: shakespeare, random")
    return [(w[:, :-1].contiguous(), w[:, 1:].contiguous()) for w in windows]


class TrainRunner:
    """One implementation: builds lazily, then runs steps on the shared batches."""

    def __init__(
        self,
        impl: str,
        build: Callable[[], tuple[torch.nn.Module, torch.optim.Optimizer, Callable]],
        dtype: str,
        device: torch.device | str = "cpu",
    ):
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
        return autocast(self.device, self.dtype)

    def step(self, batches) -> torch.Tensor:
        x, y = batches[self.step_index % len(batches)]
        self.step_index += 1
        with self.autocast():
            loss = self.loss_fn(self.model, x, y)
        loss, expert_load = loss if isinstance(loss, tuple) else (loss, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if expert_load is not None:  # MoE bias balancing, as in training
            self.model.update_balance_bias(expert_load)
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
    def build():
        torch.manual_seed(seed)
        model = Transformer(cfg).to(device)
        optimizer = make_optimizer(model, OptimConfig(lr=lr))
        return maybe_compile(model, compiled), optimizer, training_loss  # as train.compile does

    return build


def training_loss(model, x, y) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The loss a nanoseek training step backpropagates (LM loss + MTP loss + balance loss) and the
    MoE expert load its forward returned (for the balancing-bias update after the step)."""
    out = model(x, y, return_logits=False)  # as the trainer runs it: head + loss fused
    return out.loss + sum(v for v in out.aux.values() if v.requires_grad), out.expert_load


def _build_reference(module, cfg, lr: float, seed: int, device: torch.device | str = "cpu"):
    gpt_cfg = module.GPTConfig(
        block_size=cfg.max_position_embeddings,
        vocab_size=cfg.vocab_size,
        n_layer=cfg.num_hidden_layers,
        n_head=cfg.num_attention_heads,
        n_embd=cfg.hidden_size,
        dropout=0.0,
        bias=True,
    )

    def build():
        torch.manual_seed(seed)
        model = module.GPT(gpt_cfg).to(device)
        optimizer = model.configure_optimizers(weight_decay=0.1, lr=lr, betas=(0.9, 0.95))
        return model, optimizer, lambda m, x, y: m(x, y)[1]

    return build


def _build_hf(cfg, lr: float, seed: int, device: torch.device | str = "cpu"):
    """transformers' model of the same architecture, initialized with nanoseek's weights for `seed`."""

    try:
        import transformers
    except ImportError:
        raise NanoseekError("the hf peer needs transformers (pip install 'nanoseek[bench]')") from None

    def build():
        torch.manual_seed(seed)
        with tempfile.TemporaryDirectory(prefix="nanoseek-bench-hf-") as tmp:
            Transformer(cfg).save_pretrained(tmp, format="hf")
            transformers.logging.set_verbosity_error()
            model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(device)
        decay = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95)
        )
        return model, optimizer, hf_training_loss

    return build


def hf_training_loss(model, x, y) -> torch.Tensor:
    logits = model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def bench_train(
    preset: str = "gpt2-mini",
    impls: tuple[str, ...] = ("nanoseek", "reference"),
    seq_len: int = 64,
    batch: int = 12,
    dtype: str = "float32",
    ref_dtype: str = "float32",
    steps: int = 20,
    warmup: int = 5,
    rounds: int = 3,
    threads: int = 2,
    peak_seconds: float = 1.5,
    data: str = "shakespeare",
    lr: float = 1e-3,
    seed: int = 1337,
    device: str = "cpu",
) -> list[dict]:
    """Train nanoseek and its peers on the same batches; one result dict per impl, then the ratio.

    `dtype` is nanoseek's (bfloat16 = autocast), `ref_dtype` the peers'; `device` is cpu, cuda,
    cuda:N or auto (on a GPU the timers synchronize and peak_device_mib is the CUDA allocator's peak)."""
    preset = canonical_name(preset)  # results name the preset by its current name
    impls = tuple(impls)
    for impl in impls:
        if impl not in TRAIN_IMPLS:
            raise NanoseekError(f"unknown implementation {impl!r}; choose from: {', '.join(TRAIN_IMPLS)}")
    if not impls or len(set(impls)) != len(impls):
        raise NanoseekError(f"impls={impls!r}: name each implementation once")
    for name, value in (("dtype", dtype), ("ref_dtype", ref_dtype)):
        if value not in DTYPES:
            raise NanoseekError(f"{name}={value!r} is not valid; choose one of: {', '.join(DTYPES)}")
    for name, value, low in (
        ("seq_len", seq_len, 1),
        ("batch", batch, 1),
        ("steps", steps, 1),
        ("warmup", warmup, 0),
        ("rounds", rounds, 1),
        ("threads", threads, 0),
    ):
        if value < low:
            raise NanoseekError(f"{name}={value} must be >= {low}")

    where = resolve_device(device, where="--device")
    cfg = ModelConfig.from_preset(preset).replace(vocab_size=VOCAB_SIZE, max_position_embeddings=seq_len)
    if "hf" in impls:  # transformers trains no MTP module: compare the same work
        cfg = cfg.replace(num_nextn_predict_layers=0)
    builders = {}
    if "reference" in impls:
        _check_gpt2_shape(preset, cfg)
        builders["reference"] = (_build_reference(reference_gpt, cfg, lr, seed, where), ref_dtype)
    if "nanoseek" in impls:
        builders["nanoseek"] = (_build_nanoseek(cfg, lr, seed, where), dtype)
    if "nanoseek-compiled" in impls:
        builders["nanoseek-compiled"] = (_build_nanoseek(cfg, lr, seed, where, compiled=True), dtype)
    if "nanoseek-fp32" in impls:  # the same model in fp32, beside nanoseek in `dtype`
        builders["nanoseek-fp32"] = (_build_nanoseek(cfg, lr, seed, where), "float32")
    if "hf" in impls:
        builders["hf"] = (_build_hf(cfg, lr, seed, where), ref_dtype)

    with torch_threads(threads):
        n_threads = torch.get_num_threads()
        peaks = {
            dt: measure_matmul_peak(dt, n_threads, peak_seconds, where)
            for dt in sorted({d for _, d in builders.values()})
        }
        batches = [
            (x.to(where), y.to(where)) for x, y in make_batches(warmup + rounds * steps, batch, seq_len, data, seed)
        ]
        runners = [TrainRunner(impl, *builders[impl], where) for impl in impls]
        for runner in runners:
            runner.prime(batches)
        for r in range(rounds):
            for runner in runners:
                runner.run_round(batches, steps, warmup if r == 0 else 0)

    flops = train_flops_per_token(cfg, seq_len)
    machine = {
        "threads": n_threads,
        "torch": torch.__version__,
        "cpu": cpu_name(),
        **device_info(where),
        **bf16_support(where),
    }
    results = []
    for runner in runners:
        per_round = [batch * seq_len / s for s in runner.round_seconds]
        tps = statistics.median(per_round)
        peak = peaks[runner.dtype]
        results.append(
            {
                "bench": "train",
                "impl": runner.impl,
                "preset": preset,
                "dtype": runner.dtype,
                "seq_len": seq_len,
                "batch": batch,
                "tokens_per_s": round(tps, 1),
                "seconds": statistics.median(runner.round_seconds),
                "mfu": tps * flops / (peak * 1e9) if peak > 0 else None,
                "peak_rss_mib": round(runner.peak_rss / MIB, 1),
                "peak_heap_mib": None if runner.peak_heap is None else round(runner.peak_heap / MIB, 1),
                "peak_device_mib": None if runner.peak_device is None else round(runner.peak_device / MIB, 1),
                "loss": runner.loss,
                **machine,
                "steps": steps,
                "warmup": warmup,
                "rounds": rounds,
                "data": data,
                "flops_per_token": flops,
                "peak_gflops": round(peak, 1),
                "tokens_per_s_rounds": [round(t, 1) for t in per_round],
            }
        )
    by_impl = {r["impl"]: r for r in results}

    def ratio_row(**columns) -> dict:
        head = {"bench": "train", "impl": "ratio", "preset": preset, "seq_len": seq_len, "batch": batch}
        return {**head, **columns, **machine}

    def over(a: dict, b: dict, key: str) -> float | None:
        return a[key] / b[key] if a[key] is not None and b[key] is not None and b[key] > 0 else None

    if "nanoseek" in by_impl and "hf" in by_impl:
        ns, hf = by_impl["nanoseek"], by_impl["hf"]
        results.append(
            ratio_row(
                nanoseek_over_hf=ns["tokens_per_s"] / hf["tokens_per_s"],
                peak_rss_nanoseek_over_hf=over(ns, hf, "peak_rss_mib"),
                peak_heap_nanoseek_over_hf=over(ns, hf, "peak_heap_mib"),
                peak_device_nanoseek_over_hf=over(ns, hf, "peak_device_mib"),
            )
        )
    if "nanoseek-compiled" in by_impl:
        fast = by_impl["nanoseek-compiled"]
        results.append(
            ratio_row(
                **{
                    f"nanoseek-compiled_over_{impl}": fast["tokens_per_s"] / by_impl[impl]["tokens_per_s"]
                    for impl in ("nanoseek", "hf", "reference")
                    if impl in by_impl
                }
            )
        )
    if "nanoseek" in by_impl and "nanoseek-fp32" in by_impl:
        ns, fp32 = by_impl["nanoseek"], by_impl["nanoseek-fp32"]
        results.append(ratio_row(dtype=ns["dtype"], **{"nanoseek_over_nanoseek-fp32": over(ns, fp32, "tokens_per_s")}))
    if "nanoseek" in by_impl and "reference" in by_impl:
        ns, ref = by_impl["nanoseek"], by_impl["reference"]
        results.append(
            ratio_row(
                dtype=ns["dtype"],
                ref_dtype=ref["dtype"],
                nanoseek_over_reference=ns["tokens_per_s"] / ref["tokens_per_s"],
                peak_rss_nanoseek_over_reference=over(ns, ref, "peak_rss_mib"),
                peak_heap_nanoseek_over_reference=over(ns, ref, "peak_heap_mib"),
            )
        )
    return results


def train_flops_per_token(cfg, seq_len: int) -> float:
    """nanoseek's `model.flops_per_token(seq_len)`, for every implementation (identical shapes).

    Built on the meta device, so it costs no memory and works when nanoseek is not benchmarked."""
    with torch.device("meta"):
        return Transformer(cfg).flops_per_token(seq_len)


def add_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="gpt2-mini", help="a GPT-2-shaped preset (default gpt2-mini)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument(
        "--dtype",
        choices=(*DTYPES, "auto"),
        default="float32",
        help="nanoseek's compute dtype (bfloat16 = autocast on --device; auto = bfloat16 where the device "
        "has native bf16 matmuls, else float32)",
    )
    parser.add_argument("--ref-dtype", choices=tuple(DTYPES), default="float32", help="the peers' compute dtype")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before the first round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per implementation")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0 = torch's default)")
    parser.add_argument(
        "--peers",
        default="reference",
        help="comma-separated: reference (GPT-2 presets), hf (transformers, DeepSeek/Llama presets), fp32 "
        "(nanoseek itself in float32, to see what --dtype bfloat16 gains), or none",
    )
    parser.add_argument("--data", choices=("shakespeare", "random"), default="shakespeare")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time nanoseek under torch.compile (train.compile=true), as nanoseek-compiled",
    )
    parser.add_argument(
        "--peak-seconds", type=float, default=1.5, help="seconds spent measuring the matmul peak per dtype"
    )
    add_device_arg(parser, default="cpu")


def run_train(args: argparse.Namespace) -> list[dict]:
    peers = [] if args.peers == "none" else [p for p in args.peers.split(",") if p]
    for peer in peers:
        if peer not in ("reference", "hf", "fp32"):
            raise NanoseekError(f"--peers: unknown peer {peer!r}; choose from reference, hf, fp32, none")
    peers = ["nanoseek-fp32" if p == "fp32" else p for p in peers]
    impls = ("nanoseek", *(["nanoseek-compiled"] if args.compile else []), *peers)
    support = bf16_support(resolve_device(args.device))
    print(
        f"bf16 matmuls: {'native' if support['bf16_native'] else 'emulated'} ({support['bf16_evidence']}); "
        f"train with --train.dtype={support['recommended_dtype']}",
        file=sys.stderr,
    )
    if args.dtype == "auto":
        args.dtype = support["recommended_dtype"]
    return bench_train(
        args.preset,
        impls,
        seq_len=args.seq_len,
        batch=args.batch,
        dtype=args.dtype,
        ref_dtype=args.ref_dtype,
        steps=args.steps,
        warmup=args.warmup,
        rounds=args.rounds,
        threads=args.threads,
        peak_seconds=args.peak_seconds,
        data=args.data,
        device=args.device,
    )
