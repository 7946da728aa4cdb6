"""`nanoseek bench decode-kinds`: prefill and KV-cache decode at long contexts, one model per attention kind.

Every kind gets the same small DeepSeek-like model (deepseek-v3-small's body: width 256, 4 layers,
8 query heads, DeepSeekMoE with 8 routed experts top-2 + 1 shared, the first layer dense; vocab
2048; no MTP), randomly initialized with seed 0; only the attention differs:

    dense    MLA (latent 64 + RoPE key 16 per token), full causal attention
    sliding  MLA, each query sees its last --window keys (512)
    nsa      GQA (2 K/V heads of 32) + NSA: blocks of 64, 16 selected blocks, window --window
             (NSA has its own K/V per branch, so it cannot sit on MLA's latent)
    dsa      MLA + lightning indexer (4 heads of 64), --topk keys per query (V3.2's 2048)
    csa      DeepSeek-V4 attention (one shared K=V head of 64, sinks), window --v4-window (V4's 128)
             + compressed entries at rate 4, --csa-topk of them per query (V4's 512)
    hca      V4 attention, window --v4-window + every compressed entry at rate 128
    v4       V4 attention, layers alternating csa and hca (as the deepseek-v4-small preset)
    dense-gqa, dense-v4   (optional baselines) NSA's GQA and V4's attention without sparsity

Per (kind, context P): one forward over P random tokens fills a static cache of P + N positions
(`model.make_cache`, what `generate` allocates), timed once after an untimed short warm-up:
prefill_s, prefill_tokens_per_s, prefill_peak_rss_mib (anonymous memory above the baseline while it
runs) and prefill_peak_heap_mib (the C heap in use above the baseline: the live tensors, whatever
the allocator kept from earlier kinds); they show whether anything of size P x P was built. Then N
greedy single-token steps against the cache (positions P .. P + N - 1), each timed: ms_per_step (the median),
decode_tokens_per_s = 1000 / ms_per_step.

cache_bytes are the bytes of the tensors the cache objects hold, counted from the objects (each
storage once), not computed from the config; cache_bytes_per_token = cache_bytes / (P + N);
formula_bytes_per_token is `kv_cache_bytes_per_token(config, 4)` (fp32), the estimate `nanoseek
info` prints, for comparison. Every layer's cache holds every position, windowed kinds included:
the window bounds the keys a step reads, not the cache. Against dense (the first kind, when
`dense` is among --kinds): step_over_dense, prefill_over_dense, cache_over_dense. A kind whose
prefill runs out of memory gives a row with `error` instead of the timings, and the run goes on.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from nanoseek.bench.common import RssSampler, cpu_name, current_rss, release_free_memory, torch_threads
from nanoseek.config import ModelConfig
from nanoseek.config.presets import get_preset
from nanoseek.errors import NanoseekError
from nanoseek.generation.steps import decode_step, prefill
from nanoseek.model import Transformer, kv_cache_bytes_per_token

KINDS = ("dense", "sliding", "nsa", "dsa", "csa", "hca", "v4")
BASELINES = ("dense-gqa", "dense-v4")
MIB = 1 << 20
WARMUP_TOKENS = 160  # the untimed warm-up prefill (and up to 2 steps) per kind


def kind_config(kind: str, max_len: int, args: argparse.Namespace) -> ModelConfig:
    """The shared small model with `kind`'s attention, for `max_len` positions."""
    base = get_preset("deepseek-v3-small")
    base.update(num_nextn_predict_layers=0, max_position_embeddings=max_len)
    if kind == "sliding":
        base.update(sparse="sliding", sliding_window=args.window)
    elif kind == "dsa":
        base.update(sparse="dsa", index_topk=args.topk, index_n_heads=4, index_head_dim=64)
    elif kind in ("nsa", "dense-gqa"):
        base.update(attention="gqa", num_key_value_heads=2, rope_interleave=False)
        if kind == "nsa":
            base.update(sparse="nsa", nsa_block=64, nsa_topn=16, sliding_window=args.window)
    elif kind in ("csa", "hca", "v4", "dense-v4"):
        layers = {"csa": ["csa"], "hca": ["hca"], "v4": ["csa", "hca"], "dense-v4": ["dense"]}[kind]
        base.update(
            attention="v4",
            head_dim=64,
            qk_rope_head_dim=16,
            o_groups=2,
            o_lora_rank=128,
            sparse_layers=layers,
            sliding_window=args.v4_window,
            compress_rate_csa=4,
            compress_rate_hca=128,
            index_topk=args.csa_topk,
            index_n_heads=4,
            index_head_dim=64,
        )
    return ModelConfig(**base)


def cache_tensors(obj, found: dict | None = None) -> dict:
    """Every tensor a cache object holds (through lists, dicts and attributes), by storage."""
    found = {} if found is None else found
    if isinstance(obj, torch.Tensor):
        found.setdefault(obj.untyped_storage().data_ptr(), obj)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            cache_tensors(x, found)
    elif isinstance(obj, dict):
        for x in obj.values():
            cache_tensors(x, found)
    elif hasattr(obj, "__dict__"):
        for x in vars(obj).values():
            cache_tensors(x, found)
    return found


def cache_bytes(cache: list) -> int:
    """Bytes of the storages behind the cache's tensors, each counted once."""
    return sum(t.untyped_storage().nbytes() for t in cache_tensors(cache).values())


def layer_kinds(config: ModelConfig) -> list[str]:
    return [config.layer_sparse(i) for i in range(config.num_hidden_layers)]


@torch.inference_mode()
def prefill_and_decode(model, ids: torch.Tensor, new_tokens: int) -> tuple[dict, torch.Tensor]:
    """Prefill `ids` (1, P) into a cache of P + N positions, then N greedy one-token steps (positions
    P .. P + N - 1), each timed. Returns the measurements and the N + 1 tokens (the prefill's first)."""
    p = ids.shape[1]
    cache = model.make_cache(1, p + new_tokens)
    release_free_memory()
    base = current_rss()
    with RssSampler() as rss:
        t0 = time.perf_counter()
        logits = prefill(model, ids, cache)
        prefill_s = time.perf_counter() - t0
    token = logits.argmax(-1, keepdim=True)
    tokens, steps = [token], []
    for pos in range(p, p + new_tokens):
        t0 = time.perf_counter()
        token = decode_step(model, token, cache, pos).argmax(-1, keepdim=True)
        steps.append(time.perf_counter() - t0)
        tokens.append(token)
    row = {
        "prefill_s": round(prefill_s, 4),
        "prefill_tokens_per_s": round(p / prefill_s, 1),
        "prefill_peak_rss_mib": round((rss.peak - base) / MIB, 1),
        "prefill_peak_heap_mib": None if rss.heap_peak is None else round((rss.heap_peak - rss.heap_base) / MIB, 1),
        "ms_per_step": round(1000 * statistics.median(steps), 3) if steps else None,
        "cache_bytes": cache_bytes(cache),
    }
    row["decode_tokens_per_s"] = round(1000 / row["ms_per_step"], 1) if steps else None
    return row, torch.cat(tokens, dim=1)[0]


def build_model(kind: str, max_len: int, args: argparse.Namespace) -> Transformer:
    """`kind`'s model, randomly initialized with seed 0."""
    torch.manual_seed(0)
    return Transformer(kind_config(kind, max_len, args)).eval()


def run_kind(kind: str, context: int, args, machine: dict) -> tuple[dict, torch.Tensor | None]:
    """The row of `kind` at `context` and the tokens it decoded (None after an out-of-memory prefill)."""
    max_len = context + args.new_tokens
    model = build_model(kind, max_len, args)
    config = model.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, context), generator=g)
    row = {
        "bench": "decode-kinds",
        "impl": "nanoseek",
        "kind": kind,
        "attention": config.attention,
        "layers": layer_kinds(config),
        "context": context,
        "new_tokens": args.new_tokens,
    }
    tokens = None
    try:
        prefill_and_decode(model, ids[:, :WARMUP_TOKENS], min(2, args.new_tokens))  # first calls off the clock
        measured, tokens = prefill_and_decode(model, ids, args.new_tokens)
    except (MemoryError, RuntimeError) as e:  # torch's CPU allocator raises RuntimeError
        if "memory" not in str(e).lower():
            raise
        row["error"] = f"out of memory: {str(e).splitlines()[0][:200]}"
    else:
        row.update(measured)
        row["cache_mib"] = round(row["cache_bytes"] / MIB, 2)
        row["cache_bytes_per_token"] = round(row["cache_bytes"] / max_len, 1)
        row["formula_bytes_per_token"] = kv_cache_bytes_per_token(config, 4)
    row["machine"] = machine
    del model
    gc.collect()
    return row, tokens


def add_ratios(row: dict, dense: dict | None) -> None:
    if dense is None or "error" in dense or "error" in row:
        return
    if row["ms_per_step"] and dense["ms_per_step"]:
        row["step_over_dense"] = round(row["ms_per_step"] / dense["ms_per_step"], 3)
    row["prefill_over_dense"] = round(row["prefill_s"] / dense["prefill_s"], 3)
    row["cache_over_dense"] = round(row["cache_bytes"] / dense["cache_bytes"], 3)


def parse_kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    known = KINDS + BASELINES
    for kind in kinds:
        if kind not in known:
            raise NanoseekError(f"--kinds: unknown kind {kind!r}; choose from {', '.join(known)}")
    if not kinds:
        raise NanoseekError(f"--kinds is empty; choose from {', '.join(known)}")
    if "dense" in kinds:  # the ratios' reference goes first
        kinds.remove("dense")
        kinds.insert(0, "dense")
    return kinds


def parse_contexts(text: str) -> list[int]:
    try:
        contexts = [int(c) for c in text.split(",")]
    except ValueError:
        raise NanoseekError(f"--context={text!r} must be comma-separated integers (e.g. 1024,4096,16384)") from None
    if min(contexts) < 1:
        raise NanoseekError(f"--context={text!r}: every context must be a positive number of tokens")
    return contexts


def check_args(args: argparse.Namespace) -> None:
    for name in ("new_tokens", "window", "v4_window", "topk", "csa_topk"):
        if getattr(args, name) < 1:
            raise NanoseekError(f"--{name.replace('_', '-')}={getattr(args, name)} must be positive")


def run_decode_kinds(args: argparse.Namespace):
    """Yield one row per (context, kind) as it is measured; with --plot, draw them at the end."""
    kinds, contexts = parse_kinds(args.kinds), parse_contexts(args.context)
    check_args(args)
    rows = []
    with torch_threads(args.threads):
        machine = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__}
        for context in contexts:
            dense = None
            for kind in kinds:
                row, _ = run_kind(kind, context, args, machine)
                if kind == "dense":
                    dense = row
                add_ratios(row, dense)
                rows.append(row)
                yield row
    if args.plot:
        plot_decode_kinds(rows, args.plot)


def plot_decode_kinds(rows: list[dict], path: str) -> None:
    """Two panels: decode ms per step vs context (log-log), cache MiB vs context, one line per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, LogLocator, NullFormatter, ScalarFormatter

    fig, (step_ax, cache_ax) = plt.subplots(1, 2, figsize=(11, 4.4))
    styles = [("o", "-"), ("s", "--"), ("^", "-"), ("D", "-"), ("v", "-"), ("P", "-"), ("X", ":"), ("*", "-.")]
    for i, kind in enumerate(dict.fromkeys(r["kind"] for r in rows)):
        done = [r for r in rows if r["kind"] == kind and "error" not in r]
        if not done:
            continue
        marker, line = styles[i % len(styles)]
        x = [r["context"] for r in done]
        style = dict(marker=marker, linestyle=line, label=kind, color=f"C{i}")
        if line != "-":  # hollow: a kind drawn earlier with the same values (sliding's cache is dense's) shows through
            style["markerfacecolor"] = "none"
        step_ax.plot(x, [r["ms_per_step"] for r in done], **style)
        cache_ax.plot(x, [r["cache_bytes"] / MIB for r in done], **style)
    machine = rows[0]["machine"] if rows else {}
    contexts = sorted({r["context"] for r in rows})
    for ax, ylabel, title in (
        (step_ax, "decode ms per step (median)", "one-token decode step"),
        (cache_ax, "KV cache MiB (fp32, allocated)", "KV cache at the context"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(contexts))
        ax.set_xticklabels([f"{c // 1024}K" if c % 1024 == 0 else str(c) for c in contexts])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("context (prompt tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    # one legend for both panels, beside them: inside either one it covered a kind's first point
    fig.legend(*step_ax.get_legend_handles_labels(), loc="center right", fontsize=8, title="attention")
    fig.suptitle(
        f"same small DeepSeek-like model per attention kind, batch 1, "
        f"{machine.get('threads', '?')} thread(s), torch {machine.get('torch', '?')}",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_decode_kinds_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kinds",
        default=",".join(KINDS),
        help=f"comma-separated, of: {', '.join(KINDS + BASELINES)} (dense goes first: the ratios' reference)",
    )
    parser.add_argument("--context", default="1024,4096,16384", help="comma-separated prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per (kind, context)")
    parser.add_argument("--window", type=int, default=512, help="sliding and NSA window")
    parser.add_argument("--v4-window", type=int, default=128, help="csa/hca/v4 window (V4's 128)")
    parser.add_argument("--topk", type=int, default=2048, help="DSA keys per query (V3.2's 2048)")
    parser.add_argument("--csa-topk", type=int, default=512, help="CSA compressed entries per query (V4's 512)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--plot", help="PNG: decode ms/step and cache MiB vs context, per kind")
