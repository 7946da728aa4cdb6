"""`nanoseek bench attention`: dense causal SDPA against each sparse kind, the attention op alone.

Every kind gets the same queries, keys and values (B = 1, H query heads of width D, one shared
key/value head as in MLA's absorbed form, which is where DeepSeek's sparse kinds run) at each
sequence length T. The shapes (`--layout`) follow the released models' per-head proportions with
fewer heads:

    deepseek (default)  H = 8 query heads of D = 512 (V3.2's latent width, V4's head width; one
                        K/V head). DSA's indexer: H/2 heads of 128 (V3.2: 64 heads of 128 beside 128
                        query heads), about 1/16 of the attention's work per query-key pair, top-k
                        2048; CSA's indexer: H heads of 128 (V4: 64 beside 64), top-k 512; V4 window
                        128 (csa/hca), rates 4 and 128. Sliding window and NSA's window: 512 (NSA's).
                        The layer input x (what DSA's indexer and V4's compressors and indexer
                        project from) is 64 wide per head, 512 (V4-Flash: 4,096 for 64 heads;
                        V3.2 and V4-Pro 7,168 for 128), not H x D = 4,096, which made those
                        projections 8x their share of a real layer's work.
    8x64                H = 8 heads of 64, every indexer 4 heads of 32, every window 512, x 512
                        wide (the earlier layout)
Any of --heads, --head-dim, --index-heads, --index-dim, --v4-index-heads, --window, --v4-window,
--model-dim overrides its layout value.

    dense    sdpa(is_causal=True) (model/attention/core.py: PyTorch's SDPA)       O(T^2)
    sliding  sliding_window_attention (kernels/block_attention.py, the model's fast path): 64-token
             query blocks over the 64-token key blocks their window touches, as tiles  O(T (w + C))
    nsa      compressed blocks (l = 64) + the top-16 selected blocks per query block + a window of
             512, summed with fixed gates (model/attention/nsa.py, kernels/nsa.py)        O(T (T/l + n l + w))
    dsa      lightning indexer (H_I heads of width d_I) scores the visible keys per chunk of
             queries, top-k, attention over the gathered picks               O(T^2 H_I d_I + T k H D)
             (kernels/dsa.py, the path the model runs; as in MLA's absorbed form the values are
             the keys' first D columns, the latent c_KV: the picks are gathered once, and dsa's
             v is unused)
    csa      DeepSeek-V4: the window of w keys + compressed entries (rate 4) of which an indexer picks
             the top-k (--csa-topk, V4's 512), one softmax with a sink      O(T (w + k) H D + T^2/4 H_I d_I)
    hca      DeepSeek-V4: the window + every closed entry at rate 128       O(T (w + T/128) H D)
             (csa/hca pool their entries from the layer input x, as the model does; keys = values = k;
             the indexer's KL loss, a training-only extra pass, is not included, as for dsa)

FLOPs are counted, not estimated: one extra, untimed forward and backward per (kind, T) runs under
`bench/flops.py`'s counter (torch's FlopCounterMode plus the CPU SDPA kernel and causal block
skipping; matrix products only, elementwise work uncounted). Per (kind, T): forward_flops,
backward_flops, dense's (dense_forward_flops, ...), achieved GFLOP/s (forward_gflops_s, ...),
flops_over_dense (the ideal time ratio) and the efficiency ratio

    forward_efficiency = (dense forward_s * forward_flops / dense_forward_flops) / forward_s

(1.0: the kind runs its FLOPs as fast as dense SDPA runs its own; backward likewise; dense must be
among --kinds for the dense columns and the ratios).

`--forward-only` skips backward (dense at 64K in the deepseek layout: ~20 minutes forward against
~50 backward on one core): backward_s is then null and no backward columns are computed.

Reported per (kind, T): forward_s and backward_s (medians over the repeats; backward alone: the
attention's backward from a fixed random output gradient made before the clock starts, with the
indexer's scoring under no_grad as in training after warm-up; a loss computed on the output would
add elementwise passes over it that weigh little against dense's backward and a tenth of a fast
kind's), peak_rss_mib (the resident set's peak above its value when the kind starts: Linux's own
high-water mark where it can be reset, which costs the timed code nothing; else sampled every 5 ms), and
forward_over_dense (< 1 is faster). With
`--device cuda` the inputs and ops live on the GPU, every timing ends with a synchronize, and
peak_device_mib is the CUDA allocator's peak above its baseline; one untimed run per kind and length goes
first there (a shape's first call can build kernel plans, which would be charged to the first kind).
`--warmup N` sets the untimed runs anywhere: on a CPU a first run at long lengths also pays for
touching its fresh memory (page faults on every new tensor of hundreds of MB: at 16K in the deepseek
layout one Zen-4 core ran NSA's forward 7-10% faster after one untimed run). On a CPU the C++
kernels are built (or loaded from the extension cache) before the first timing, so a build after an
edit of their sources is not charged to the first kind that calls them.
`--dtype bfloat16` runs every kind under bf16 autocast, as training does (inputs and weights stay fp32).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nanoseek.bench.common import PeakRss, cpu_name, device_info, release_free_memory, torch_threads
from nanoseek.bench.flops import flop_counter, flops_by_op
from nanoseek.config import ModelConfig
from nanoseek.device import DevicePeak, add_device_arg, autocast, resolve_device, synchronize
from nanoseek.errors import NanoseekError
from nanoseek.kernels.block_attention import sliding_window_attention
from nanoseek.kernels.csa import SparseCompressedAttention
from nanoseek.kernels.dsa import sparse_attention
from nanoseek.kernels.native import load as load_kernel
from nanoseek.kernels.nsa import ChunkedNativeSparseAttention
from nanoseek.model.attention.core import causal_attention, sdpa
from nanoseek.model.attention.dsa import LightningIndexer
from nanoseek.model.position import rope_inv_freq

KINDS = ("dense", "sliding", "nsa", "dsa", "csa", "hca")


class DsaOp(torch.nn.Module):
    """The DSA attention of one layer, fed with ready-made q/k (the indexer keeps its weights); the values
    are k[..., :d_v], as in the model's absorbed MLA (v only gives d_v)."""

    def __init__(self, dim: int, heads: int, index_heads: int, index_dim: int, topk: int):
        super().__init__()

        cfg = ModelConfig(
            hidden_size=dim,
            num_attention_heads=heads,
            attention="mla",
            q_lora_rank=dim,
            kv_lora_rank=dim,
            qk_nope_head_dim=16,
            qk_rope_head_dim=16,
            v_head_dim=16,
            index_topk=topk,
            index_n_heads=index_heads,
            index_head_dim=index_dim,
            sparse="dsa",
            max_position_embeddings=8,
        )
        self.indexer = LightningIndexer(cfg)
        self.rope_dim = cfg.qk_rope_head_dim

    def forward(self, q, k, v, x, scale):
        t = x.shape[1]
        angles = torch.arange(t, dtype=torch.float32, device=x.device)[:, None] * rope_inv_freq(
            self.rope_dim, 10000.0
        ).to(x.device)
        rope = (angles.cos(), angles.sin())
        with torch.no_grad():
            keys = self.indexer.keys(x, rope)
        return sparse_attention(self.indexer, x, x, keys, rope, 0, q, k, v.shape[-1], scale)


class NsaOp(torch.nn.Module):
    """The three NSA branches over ready-made q/k/v (one k/v set shared by the branches)."""

    def __init__(self, dim: int, heads: int, block: int, topn: int, window: int):
        super().__init__()

        cfg = ModelConfig(
            hidden_size=dim,
            num_attention_heads=heads,
            attention="mqa",
            sparse="nsa",  # 1 k/v head
            nsa_block=block,
            nsa_topn=topn,
            sliding_window=window,
            max_position_embeddings=8,
        )
        self.attn = ChunkedNativeSparseAttention(cfg)  # the default (kernels) path

    def forward(self, q, k, v, scale):
        a, t = self.attn, q.shape[2]
        if a.covers_every_block(0, t):
            o_cmp, _ = a.compressed_attention(q, a.compress(k), a.compress(v, values=True), 0, with_scores=False)
            o_slc = causal_attention(q, k, v, 0, scale)
        else:
            o_cmp, p_cmp = a.compressed_attention(q, a.compress(k), a.compress(v, values=True), 0)
            o_slc = a.selected_attention(q, k, v, p_cmp, 0)
        o_win = a.window_attention(q, k, v, 0)
        return (o_cmp + o_slc + o_win) / 3


class CompressedOp(torch.nn.Module):
    """A V4 CSA or HCA layer's attention (model/attention/compressed.py, with kernels/csa.py's fast path)
    over ready-made q and shared k."""

    def __init__(
        self, kind: str, dim: int, heads: int, head_dim: int, window: int, topk: int, index_heads: int, index_dim: int
    ):
        super().__init__()

        cfg = ModelConfig(
            hidden_size=dim,
            num_attention_heads=heads,
            head_dim=head_dim,
            attention="v4",
            q_lora_rank=dim,
            qk_rope_head_dim=16,
            o_groups=1,
            o_lora_rank=8,
            sliding_window=window,
            sparse=kind,
            index_topk=topk,
            index_n_heads=index_heads,
            index_head_dim=index_dim,
            max_position_embeddings=8,
        )
        # the model's fast path (CSA's long chunks gather their picks); no indexer KL pass, as dsa's op has none
        self.attn = SparseCompressedAttention(cfg, 0).eval()

    def forward(self, q, k, x):
        a, t = self.attn, x.shape[1]
        pos = torch.arange(t, device=x.device)
        cos, sin = a.rope(pos)
        entries, index_entries = a.compressed_entries(x, None, 0, t)
        index_in = (x, x) if a.indexer is not None else None
        o = a.attend(q.transpose(1, 2), k[:, 0], 0, 0, pos, entries, index_entries, index_in, cos, sin)
        return o.transpose(1, 2)


def make_inputs(t: int, heads: int, dim: int, model_dim: int, seed: int = 0, device: torch.device | str = "cpu"):
    """q (1, heads, T, dim), k and v (1, 1, T, dim) with gradients, the layer input x (1, T, model_dim)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, n, t, dim, generator=g).to(device).requires_grad_() for n in (heads, 1, 1))
    x = torch.randn(1, t, model_dim, generator=g).to(device)
    return q, k, v, x


def run_kind(kind: str, q, k, v, x, args, dsa: DsaOp | None, nsa: NsaOp | None = None, v4=None):
    scale = q.shape[-1] ** -0.5
    if kind == "dense":
        return sdpa(q, k, v, is_causal=True, scale=scale)
    if kind == "sliding":
        return sliding_window_attention(q, k, v, 0, args.window, scale)
    if kind == "nsa":
        return nsa(q, k, v, scale)
    if kind in ("csa", "hca"):
        return v4[kind](q, k, x)
    return dsa(q, k, v, x, scale)


def count_kind(kind: str, t: int, args, dsa, nsa=None, v4=None, device: torch.device | str = "cpu") -> dict:
    """Forward and backward FLOPs of one run of `kind` at length t, counted (see bench/flops.py)."""
    q, k, v, x = make_inputs(t, args.heads, args.head_dim, args.model_dim, device=device)
    with flop_counter() as forward, autocast(device, args.dtype):
        out = run_kind(kind, q, k, v, x, args, dsa, nsa, v4)
    counted = {"forward_flops": forward.get_total_flops(), "forward_flops_by_op": flops_by_op(forward)}
    if args.forward_only:
        return counted
    d_out = output_grad(out)
    with flop_counter() as backward:
        out.backward(d_out)
    return {**counted, "backward_flops": backward.get_total_flops(), "backward_flops_by_op": flops_by_op(backward)}


def output_grad(out: torch.Tensor) -> torch.Tensor:
    """A fixed random gradient for the attention's output, drawn where it lives (seeded: every kind on
    a device gets the same)."""
    g = torch.Generator(device=out.device).manual_seed(1)
    return torch.randn(out.shape, generator=g, device=out.device, dtype=out.dtype)


def efficiency_columns(row: dict, dense: dict) -> dict:
    """Dense's FLOPs, achieved GFLOP/s and the efficiency ratios of `row` against the dense row."""
    cols = {}
    for phase in ("forward", "backward"):
        if row.get(f"{phase}_s") is None or dense.get(f"{phase}_s") is None:
            continue  # --forward-only
        flops, seconds = row[f"{phase}_flops"], row[f"{phase}_s"]
        dense_flops, dense_s = dense[f"{phase}_flops"], dense[f"{phase}_s"]
        cols[f"dense_{phase}_flops"] = dense_flops
        cols[f"{phase}_gflops_s"] = round(flops / seconds / 1e9, 2) if seconds > 0 else None
        ideal_s = dense_s * flops / dense_flops if dense_flops else None
        cols[f"{phase}_efficiency"] = round(ideal_s / seconds, 3) if ideal_s is not None and seconds > 0 else None
    cols["flops_over_dense"] = (
        round(row["forward_flops"] / dense["forward_flops"], 4) if dense["forward_flops"] else None
    )
    return cols


def time_kind(kind: str, t: int, args, dsa, nsa=None, v4=None, device: torch.device | str = "cpu") -> dict:
    forward, backward = [], []
    release_free_memory()
    repeats = args.repeats if t <= 8192 else 1
    warmup = args.warmup
    if warmup is None:  # a GPU's first calls per shape build kernels' plans (cuDNN); a CPU's run cold
        warmup = int(torch.device(device).type == "cuda")
    with PeakRss() as rss, DevicePeak(device) as window:
        for i in range(warmup + repeats):
            q, k, v, x = make_inputs(t, args.heads, args.head_dim, args.model_dim, device=device)
            synchronize(device)
            t0 = time.perf_counter()
            with autocast(device, args.dtype):
                out = run_kind(kind, q, k, v, x, args, dsa, nsa, v4)
            synchronize(device)
            t1 = time.perf_counter()
            backward_s = d_out = None
            if not args.forward_only:
                d_out = output_grad(out)
                synchronize(device)
                t2 = time.perf_counter()
                out.backward(d_out)
                synchronize(device)
                backward_s = time.perf_counter() - t2
            if i >= warmup:
                forward.append(t1 - t0)
                backward.append(backward_s)
            del out, d_out, q, k, v, x
    row = {
        "forward_s": round(statistics.median(forward), 4),
        "backward_s": None if args.forward_only else round(statistics.median(backward), 4),
        "peak_rss_mib": round(rss.growth / (1 << 20), 1),
    }
    if window.peak is not None:
        row["peak_device_mib"] = round(window.peak / (1 << 20), 1)
    return row


# per-head proportions of the released models with fewer heads, and the earlier 8 x 64 layout
LAYOUTS = {
    "deepseek": dict(
        heads=8, head_dim=512, index_heads=4, index_dim=128, v4_index_heads=8, window=512, v4_window=128, model_dim=512
    ),
    "8x64": dict(
        heads=8, head_dim=64, index_heads=4, index_dim=32, v4_index_heads=4, window=512, v4_window=512, model_dim=512
    ),
}


def apply_layout(args: argparse.Namespace) -> None:
    """Fill every shape argument left unset from --layout."""
    if args.layout not in LAYOUTS:
        raise NanoseekError(f"--layout={args.layout!r}: choose from {', '.join(LAYOUTS)}")
    for name, value in LAYOUTS[args.layout].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
        if getattr(args, name) < 1:
            raise NanoseekError(f"--{name.replace('_', '-')}={getattr(args, name)} must be positive")


def add_attention_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seq", default="1024,4096,16384,32768", help="comma-separated sequence lengths")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of: {', '.join(KINDS)}")
    parser.add_argument(
        "--layout", default="deepseek", help=f"shape defaults, one of: {', '.join(LAYOUTS)} (see the module doc)"
    )
    parser.add_argument("--heads", type=int, default=None, help="query heads (deepseek: 8)")
    parser.add_argument("--head-dim", type=int, default=None, help="head width (deepseek: 512)")
    parser.add_argument("--window", type=int, default=None, help="sliding and NSA window (512)")
    parser.add_argument("--v4-window", type=int, default=None, help="csa/hca window (deepseek: V4's 128)")
    parser.add_argument("--topk", type=int, default=2048, help="DSA keys per query")
    parser.add_argument("--nsa-block", type=int, default=64, help="NSA block length")
    parser.add_argument("--nsa-topn", type=int, default=16, help="NSA selected blocks per query block")
    parser.add_argument("--csa-topk", type=int, default=512, help="CSA compressed entries per query (V4: 512)")
    parser.add_argument("--index-heads", type=int, default=None, help="DSA indexer heads (deepseek: heads / 2)")
    parser.add_argument("--index-dim", type=int, default=None, help="indexer head width (deepseek: 128)")
    parser.add_argument("--v4-index-heads", type=int, default=None, help="CSA indexer heads (deepseek: heads)")
    parser.add_argument(
        "--model-dim", type=int, default=None, help="width of the layer input the indexers and compressors read (512)"
    )
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting pass")
    parser.add_argument(
        "--forward-only", action="store_true", help="time (and count) the forward alone: backward_s is null"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (1 above 8K tokens)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed runs per kind and length before the timed ones (default: 1 on CUDA, 0 on a CPU, where "
        "a first run also pays the first touch of its fresh memory)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="compute dtype (bfloat16: autocast on --device)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--plot", help="write a log-log PNG of forward time vs length here")

    add_device_arg(parser, default="cpu")


def run_attention(args: argparse.Namespace):
    """Yield one row per (length, kind) as it is measured; with --plot, draw them all at the end."""
    try:
        seqs = [int(s) for s in args.seq.split(",")]
    except ValueError:
        raise NanoseekError(f"--seq={args.seq!r} must be comma-separated integers") from None
    kinds = args.kinds.split(",")
    for kind in kinds:
        if kind not in KINDS:
            raise NanoseekError(f"--kinds: unknown kind {kind!r}; choose from {', '.join(KINDS)}")
    if min(seqs) < 1:
        raise NanoseekError("--seq must be positive")
    if args.warmup is not None and args.warmup < 0:
        raise NanoseekError(f"--warmup={args.warmup} must be >= 0")
    apply_layout(args)
    device = resolve_device(args.device, where="--device")
    torch.manual_seed(0)
    dsa = DsaOp(args.model_dim, args.heads, args.index_heads, args.index_dim, args.topk)
    nsa = NsaOp(args.heads * args.head_dim, args.heads, args.nsa_block, args.nsa_topn, args.window)
    v4 = {
        kind: CompressedOp(
            kind,
            args.model_dim,
            args.heads,
            args.head_dim,
            args.v4_window,
            args.csa_topk,
            args.v4_index_heads,
            args.index_dim,
        ).to(device)
        for kind in ("csa", "hca")
    }
    dsa, nsa = dsa.to(device), nsa.to(device)
    if device.type == "cpu":  # the C++ kernels build (once per source change, ~30 s) before any timing
        for name in ("gathered_attention", "indexer_topk"):
            load_kernel(name)
    results = []
    with torch_threads(args.threads):
        machine = {
            "cpu": cpu_name(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "dtype": args.dtype,
            **device_info(device),
        }
        shapes = {name: getattr(args, name) for name in LAYOUTS[args.layout]}
        for t in seqs:
            dense = None
            for kind in kinds:
                row = {
                    "bench": "attention",
                    "impl": "nanoseek",
                    "kind": kind,
                    "seq": t,
                    "layout": args.layout,
                    **shapes,
                    **time_kind(kind, t, args, dsa, nsa, v4, device),
                }
                if not args.no_flops:
                    row.update(count_kind(kind, t, args, dsa, nsa, v4, device))
                if kind == "dense":
                    dense = row
                if dense is not None and kind != "dense":
                    row["forward_over_dense"] = round(row["forward_s"] / dense["forward_s"], 3)
                    if row["backward_s"] is not None and dense["backward_s"] is not None:
                        row["backward_over_dense"] = round(row["backward_s"] / dense["backward_s"], 3)
                if dense is not None and not args.no_flops:
                    row.update(efficiency_columns(row, dense))
                row["machine"] = machine
                results.append(row)
                yield row
    if args.plot:
        plot_times(results, args.plot)


def plot_times(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for kind in dict.fromkeys(r["kind"] for r in results):
        rows = [r for r in results if r["kind"] == kind]
        for axis, key in zip(ax, ("forward_s", "backward_s")):
            timed = [r for r in rows if r[key] is not None]
            axis.plot([r["seq"] for r in timed], [r[key] for r in timed], marker="o", label=kind)
    for axis, title in zip(ax, ("forward", "backward")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length (tokens)")
        axis.set_ylabel("seconds")
        axis.set_title(f"attention {title}")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
