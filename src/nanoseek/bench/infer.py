"""`nanoseek bench prefill` and `nanoseek bench decode`: inference speed against transformers.

The model is a preset (randomly initialized, seed 0) or a checkpoint. The peer `hf` is Hugging Face
transformers running the same architecture with the same weights: nanoseek saves the model in HF
format to a temporary folder and `AutoModelForCausalLM` loads it (DeepseekV3ForCausalLM for the
DeepSeek presets, LlamaForCausalLM for Llama). Both run fp32 in inference mode, one process,
alternating A/B rounds to cancel machine drift; medians over the rounds. `--device cuda` runs
both on a GPU (each timing ends when its tokens reach the host; the peak and the bandwidth are
measured on the GPU).

prefill  one forward over a (1, P) prompt that fills the KV cache:
         tokens_per_s = P / seconds; ttft_s = seconds + sampling the first token;
         mfu = tokens_per_s * forward FLOPs per token (a third of training's: 2 N_active + 2 L H (d_qk + d_v) P)
               / the measured fp32 matmul peak.
         --compile adds nanoseek-compiled: the prefill through `compiled_prefill` (one dynamic-shape
         graph; its first call, the compile, is reported as compile_s and not timed).
decode   greedy generation of N new tokens after a short prompt, at batch b, with the KV cache
         (nanoseek: static cache, absorbed MLA, and with --compile also its compiled static-shape
         step; transformers: `generate` with its default cache);
         the prompt's prefill is timed apart and subtracted:
         tokens_per_s = b * N / decode seconds; ms_per_step;
         bandwidth_fraction = bytes read per step / step time / the measured copy bandwidth, where
         bytes per step = the fp32 weights a step touches (active parameters plus, at batch > 1, the
         routed experts its tokens reach, bounded by all of them) + the KV cache read.
A last line per bench gives each nanoseek impl / hf (nanoseek_over_hf, nanoseek-compiled_over_hf).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time

import torch

from nanoseek.bench.common import cpu_name, device_info, measure_matmul_peak, torch_threads
from nanoseek.config import ModelConfig
from nanoseek.device import add_device_arg, resolve_device, synchronize
from nanoseek.errors import NanoseekError
from nanoseek.generation import compiled_prefill, generate
from nanoseek.generation.compiled import compiled_decoders
from nanoseek.io import load_model
from nanoseek.model import Transformer
from nanoseek.model.transformer import kv_cache_bytes_per_token


def measure_bandwidth(seconds: float = 0.5, device: torch.device | str = "cpu") -> float:
    """Best GB/s of a 256 MiB fp32 copy on the device (read + write counted)."""
    src = torch.ones(64 << 20, device=device)
    dst = torch.empty_like(src)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = max(best, 2 * src.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return best


def build_models(args):
    device = resolve_device(args.device, where="--device")
    if args.ckpt:
        ours = load_model(args.ckpt)
    else:
        torch.manual_seed(0)
        ours = Transformer(ModelConfig.from_preset(args.preset)).eval()
    peers = {}
    if "hf" in args.peers:
        try:
            import transformers
        except ImportError:
            raise NanoseekError("--peers hf needs transformers (pip install 'nanoseek[bench]')") from None
        transformers.logging.set_verbosity_error()  # its load report lists the MTP layers it ignores
        tmp = tempfile.TemporaryDirectory(prefix="nanoseek-bench-hf-")
        ours.save_pretrained(tmp.name, format="hf")
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp.name, dtype=torch.float32).eval()
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 0
        peers["hf"] = hf.to(device)
        tmp.cleanup()
    return ours.to(device), peers


def forward_flops_per_token(model, context: int) -> float:
    return model.flops_per_token(context) / 3  # training FLOPs are 3x the forward's


@torch.inference_mode()
def time_prefill(impl: str, model, ids: torch.Tensor, compiled: bool = False) -> float:
    """Seconds to the first token; `compiled`: nanoseek through `compiled_prefill`."""
    t0 = time.perf_counter()
    if impl.startswith("nanoseek"):
        cache = model.make_cache(ids.shape[0], ids.shape[1] + 1)
        logits = (
            compiled_prefill(model)(ids, cache)[:, None] if compiled else model(ids, cache=cache, last_only=True).logits
        )
    else:
        logits = model(ids, use_cache=True).logits[:, -1]
    logits.argmax(-1).cpu()  # the first token reaches the host: a GPU has finished
    return time.perf_counter() - t0


@torch.inference_mode()
def time_generate(impl: str, model, ids: torch.Tensor, new: int, cuda_graphs: bool = True) -> float:
    t0 = time.perf_counter()
    if impl.startswith("nanoseek"):
        out = generate(
            model, ids, max_new_tokens=new, temperature=0, compile=impl == "nanoseek-compiled", cuda_graphs=cuda_graphs
        )
    else:
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)[:, ids.shape[1] :]
    out = out.cpu()
    assert out.shape[-1] == new
    return time.perf_counter() - t0


def weight_bytes_per_step(model, batch: int) -> float:
    """fp32 bytes of the weights one decode step reads (active experts only at batch 1)."""
    params = model.num_params()
    moe = model.moe_layers()
    touched = params["matmul_active"]  # the token's matmul weights, a tied head included once
    if moe and batch > 1:
        per_expert = moe[0].experts.gate_up_proj[0].numel() + moe[0].experts.down_proj[0].numel()
        extra = min(batch * moe[0].top_k, moe[0].n_experts) - moe[0].top_k
        touched += len(moe) * extra * per_expert
    return 4.0 * touched


def run_prefill(args) -> list[dict]:
    ours, peers = build_models(args)
    device = next(ours.parameters()).device
    impls = {"nanoseek": ours, **({"nanoseek-compiled": ours} if args.compile else {}), **peers}
    rows = []
    with torch_threads(args.threads):
        peak = measure_matmul_peak("float32", args.threads, device=device)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, ours.config.vocab_size, (1, args.prompt_len), generator=g).to(device)
        first_call = {
            impl: time_prefill(impl, model, ids, impl == "nanoseek-compiled")  # warm-up (and the compile)
            for impl, model in impls.items()
        }
        times = {impl: [] for impl in impls}
        for _ in range(args.rounds):
            for impl, model in impls.items():
                times[impl].append(time_prefill(impl, model, ids, impl == "nanoseek-compiled"))
        for impl in impls:
            sec = statistics.median(times[impl])
            tps = args.prompt_len / sec
            rows.append(
                {
                    "bench": "prefill",
                    "impl": impl,
                    "prompt_len": args.prompt_len,
                    "seconds": round(sec, 4),
                    "ttft_s": round(sec, 4),
                    "tokens_per_s": round(tps, 1),
                    "mfu": round(tps * forward_flops_per_token(ours, args.prompt_len) / (peak * 1e9), 3),
                    "rounds": [round(t, 4) for t in times[impl]],
                    **({"compile_s": round(first_call[impl], 1)} if impl == "nanoseek-compiled" else {}),
                }
            )
        machine = {
            "cpu": cpu_name(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "matmul_peak_gflops": round(peak, 1),
            "model": args.ckpt or args.preset,
            **device_info(device),
        }
    for r in rows:
        r["machine"] = machine
    if "hf" in impls:
        level = {r["impl"]: r["tokens_per_s"] for r in rows}
        rows.append(
            {
                "bench": "prefill",
                "impl": "ratio",
                **{f"{impl}_over_hf": round(level[impl] / level["hf"], 2) for impl in impls if impl != "hf"},
            }
        )
    return rows


def run_decode(args) -> list[dict]:
    ours, peers = build_models(args)
    device = next(ours.parameters()).device
    impls = {"nanoseek": ours, **({"nanoseek-compiled": ours} if args.compile else {}), **peers}
    rows = []
    with torch_threads(args.threads):
        bandwidth = measure_bandwidth(device=device)
        g = torch.Generator().manual_seed(0)
        for batch in [int(b) for b in args.batch.split(",")]:
            for context in [int(c) for c in args.context.split(",")]:
                if context + args.new_tokens > ours.config.max_position_embeddings:
                    raise NanoseekError(
                        f"--context {context} + --new-tokens {args.new_tokens} exceeds the model's "
                        f"{ours.config.max_position_embeddings} positions"
                    )
                ids = torch.randint(0, ours.config.vocab_size, (batch, context), generator=g).to(device)
                for impl, model in impls.items():  # warm-up (and the compile, once per batch and length bucket)
                    time_generate(impl, model, ids, args.new_tokens, not args.no_cuda_graphs)
                decode = {impl: [] for impl in impls}
                for _ in range(args.rounds):
                    for impl, model in impls.items():
                        total = time_generate(impl, model, ids, args.new_tokens, not args.no_cuda_graphs)
                        decode[impl].append(total - time_prefill(impl, model, ids))
                kv = kv_cache_bytes_per_token(ours.config, 4) * (context + args.new_tokens / 2) * batch
                step_bytes = weight_bytes_per_step(ours, batch) + kv
                for impl in impls:
                    sec = statistics.median(decode[impl])
                    step = sec / args.new_tokens
                    rows.append(
                        {
                            "bench": "decode",
                            "impl": impl,
                            "batch": batch,
                            "context": context,
                            "new_tokens": args.new_tokens,
                            "seconds": round(sec, 4),
                            "tokens_per_s": round(batch * args.new_tokens / sec, 1),
                            "ms_per_step": round(1000 * step, 3),
                            "bandwidth_fraction": round(step_bytes / step / (bandwidth * 1e9), 3),
                        }
                    )
                if "hf" in impls:
                    level = {r["impl"]: r["tokens_per_s"] for r in rows[-len(impls) :]}
                    rows.append(
                        {
                            "bench": "decode",
                            "impl": "ratio",
                            "batch": batch,
                            "context": context,
                            **{
                                f"{impl}_over_hf": round(level[impl] / level["hf"], 2) for impl in impls if impl != "hf"
                            },
                        }
                    )
        machine = {
            "cpu": cpu_name(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "copy_bandwidth_gbs": round(bandwidth, 1),
            "model": args.ckpt or args.preset,
            **device_info(device),
        }
        if device.type == "cuda" and args.compile:  # whether the compiled steps replayed CUDA graphs
            graphs = [d.graph for d in compiled_decoders(ours).values()]
            machine["cuda_graphs"] = bool(graphs) and all(g is not None and g.usable for g in graphs)
    for r in rows:
        if r["impl"] != "ratio":
            r["machine"] = machine
    if args.plot:
        plot_decode(rows, args.plot)
    return rows


def plot_decode(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for impl in dict.fromkeys(r["impl"] for r in rows if r["impl"] != "ratio"):
        for batch in sorted({r["batch"] for r in rows if r["impl"] == impl}):
            pts = [r for r in rows if r["impl"] == impl and r["batch"] == batch]
            ax.plot(
                [r["context"] for r in pts],
                [r["tokens_per_s"] for r in pts],
                marker="o",
                label=f"{impl}, batch {batch}",
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (prompt tokens)")
    ax.set_ylabel("decode tokens/s")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", nargs="?", help="a checkpoint (default: a random --preset model)")
    parser.add_argument("--preset", default="deepseek-v3-small")
    parser.add_argument("--peers", default="hf", help="comma-separated: hf (or empty for none)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    add_device_arg(parser, default="cpu")


def add_prefill_args(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time nanoseek's compiled prefill (generate(compile_prefill=True); compiles once)",
    )


def add_decode_args(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--context", default="16", help="comma-separated prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--plot", help="PNG of decode tokens/s vs context")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time nanoseek's compiled static-shape decode step (compiles once per batch)",
    )
    parser.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="the compiled step without CUDA-graph replay (generate(..., cuda_graphs=False))",
    )
