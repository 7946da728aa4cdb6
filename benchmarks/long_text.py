"""Far context on real text: validation loss by position, dense vs each sparse attention kind.

benchmarks/long_range.py asks whether a sparse kind can retrieve one planted fact from far back;
this benchmark asks whether it keeps what a language model gains from far context in ordinary text.
A character-level model of a corpus (tiny Shakespeare by default; --data tang or any text file)
is trained once per attention kind and seed, and scored on the held-out text at every position of
its context: the loss at position p predicts character p + 1 from the p + 1 characters before it,
so the drop of the loss with p is the model's use of far context, and a sparse kind that loses far
context shows it as a gap to its dense baseline at the late positions.

The kinds and their model (2 layers, width 128, 4 heads) are long_range.py's `config()`, with the
vocabulary set to the corpus' characters (the repo's char tokenizer; every id is a character of the
corpus) and the window (32 keys for sliding, nsa, csa and hca) set by --window (nsa's blocks stay 32):

    family MLA   dense (full causal MLA), sliding (window only), dsa (lightning indexer, top 128)
    family MHA   dense-mha (full causal MHA), nsa (blocks of 32, 8 selected per block of queries,
                 window), nsa-token (the same, a selection per query)
    family V4    dense-v4 (V4 attention, no window), csa (window + compressed rate 4, top 64),
                 hca (window + every compressed entry of rate 128), v4 (layer 0 csa, layer 1 hca)

Data: the text's last 10% is held out. Training windows are the first 90% packed into
non-overlapping contexts of --seq tokens (a window's targets are the next characters), visited in
an order drawn from the seed and reshuffled each epoch; --tokens per step (batch = tokens / seq).
Validation: every non-overlapping --seq window of the held-out text (or the first --val-windows).
Each kind trains with the same seed, data order, steps (or wall time), AdamW (lr 3e-3, betas
0.9/0.98, no weight decay, gradient clip 1.0) with a linear warm-up over the first --lr-warmup
steps and a constant rate after. --curriculum (off by default) trains every kind on long_range.py's
length curriculum: windows of L/16 for the first 40% of the steps (of the seconds), L/4 for the
next 30%, then L (the same --tokens per step; every kind is scored at L only). dsa, csa and v4 attend
densely (the whole model learning, the indexer by its KL loss beside it) for the first
--warmup-fraction of the steps (of the seconds with --seconds), as in long_range.py, then
sparsely; they are scored sparse.

Position buckets are derived from --seq L: [0, L/32), [L/32, L/8), [L/8, L/2), [L/2, L), which is
[0, 64), [64, 256), [256, 1024), [1024, 2048) at the default L = 2048 (edges that coincide at a
small L are merged). A bucket's loss is the mean cross-entropy (nats per character) over its
positions in every validation window; val_loss is the mean over all positions.

Reading it: the held-out text differs from bucket to bucket, so a curve's shape mixes context use
with what the text at those positions is; the differences to the dense baseline of the same seed
(the second panel) cancel that. At small budgets the windowed kinds learn local statistics faster
than dense attention, which shifts the whole gap below zero; lost far context is the gap rising
from the first bucket (where every kind sees nearly all the context) to the last.

    python benchmarks/long_text.py [--seq 2048] [--steps 200 | --seconds S] [--kinds dense,sliding,...]
        [--seeds 0,1,2] [--tokens 4096] [--curriculum] [--data shakespeare] [--window 32] [--threads 1]
        [--out FILE.jsonl] [--plot FILE.png]

Prints (and writes to --out) one JSON line per (kind, seed): kind, seed, buckets and their losses,
val_loss, steps, wall and CPU seconds per step (training only), evaluation seconds, final training
loss. --plot draws two panels: the validation loss against the position bucket per kind (mean over
seeds, bars from the lowest to the highest seed; dense kinds solid, sparse dashed), and each sparse
kind's loss minus its family's dense baseline of the same seed (mean, bars over seeds). --seconds S
trains each kind for S seconds of wall time instead of --steps (equal wall time rather than equal
steps; the steps taken are reported).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nanoseek import Transformer
from nanoseek.data import corpus_path
from nanoseek.data.tokenizer import CharTokenizer


def _sibling(name: str):
    """benchmarks/NAME.py as a module, however this file was loaded (a script, or by path in the tests)."""
    spec = importlib.util.spec_from_file_location(
        f"benchmarks_{name}", Path(__file__).resolve().with_name(f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


long_range = _sibling("long_range")  # the kinds and their models
KINDS, recall_config = long_range.KINDS, long_range.config

FAMILIES = {"dense": ("sliding", "dsa"), "dense-mha": ("nsa", "nsa-token"), "dense-v4": ("csa", "hca", "v4")}
BASELINE = {sparse: dense for dense, members in FAMILIES.items() for sparse in members}
WARMED = ("dsa", "csa", "v4")  # indexed kinds: dense warm-up first


def buckets(seq: int) -> list[tuple[int, int]]:
    """Position buckets for windows of `seq` tokens: edges at seq/32, seq/8, seq/2 (merged when equal)."""
    edges = sorted({0, *(max(1, seq // d) for d in (32, 8, 2)), seq})
    return [(a, b) for a, b in zip(edges, edges[1:]) if a < seq]


def load_text(data: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Character ids of the corpus split 90/10 (train, held out), and the number of distinct characters."""
    text = Path(corpus_path(data)).read_text(encoding="utf-8")
    tokenizer = CharTokenizer.train([text])
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    vocab = len(tokenizer.chars)  # every id is a character id: the specials and byte tokens never occur
    assert int(ids.max()) < vocab
    split = int(0.9 * len(ids))
    return ids[:split], ids[split:], vocab


def windows(ids: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping (inputs, targets) windows of `seq` tokens: (N, seq) each."""
    n = (len(ids) - 1) // seq
    return ids[: n * seq].view(n, seq), ids[1 : n * seq + 1].view(n, seq)


def train_length(progress: float, seq: int) -> int:
    """--curriculum: long_range.py's lengths, seq/16 for the first 40% of training, seq/4 for 30%, then seq."""
    return min(seq, 2 * long_range.curriculum(progress, 1.0, (seq + 1) // 2))


def model_config(kind: str, seq: int, vocab: int, window: int):
    cfg = recall_config(kind, (seq + 1) // 2)  # long_range's model at context 2 * n >= seq
    return cfg.replace(vocab_size=vocab, sliding_window=window)


class Batches:
    """Packed training windows in a seeded order, reshuffled at each epoch: the same for every kind."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int, seed: int):
        self.x, self.y, self.batch = x, y, min(batch, len(x))
        self.g = torch.Generator().manual_seed(seed)
        self.order, self.at = torch.randperm(len(x), generator=self.g), 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.at + self.batch > len(self.order):
            self.order, self.at = torch.randperm(len(self.x), generator=self.g), 0
        pick = self.order[self.at : self.at + self.batch]
        self.at += self.batch
        return self.x[pick], self.y[pick]


def train(kind: str, seed: int, train_ids: torch.Tensor, vocab: int, args) -> tuple[Transformer, dict]:
    """Train one kind from seed `seed` for args.steps steps (or args.seconds of wall time)."""
    torch.manual_seed(seed)
    model = Transformer(model_config(kind, args.seq, vocab, args.window)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.98))
    loaders = {}  # training length -> its packed windows (one length without --curriculum)
    warm = args.warmup_fraction if kind in WARMED else 0.0
    step, loss, start, cpu = 0, float("nan"), time.perf_counter(), time.process_time()
    while True:
        elapsed = time.perf_counter() - start
        progress = elapsed / args.seconds if args.seconds else step / args.steps
        if progress >= 1:
            break
        model.set_dsa_warmup(progress < warm, freeze_model=False)  # from scratch: all of it trains densely
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.lr_warmup)
        length = train_length(progress, args.seq) if args.curriculum else args.seq
        if length not in loaders:
            loaders[length] = Batches(*windows(train_ids, length), max(1, args.tokens // length), seed)
        x, y = loaders[length].next()
        loss, step = long_range.train_step(model, opt, x, y, return_logits=False), step + 1
    model.set_dsa_warmup(False)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    stats = {"steps": step, "train_seconds": round(wall, 1), "seconds_per_step": round(wall / max(1, step), 3)}
    # CPU seconds per step: near the wall time when the process has its cores alone, lower when it shares them
    stats["cpu_seconds_per_step"] = round(cpu / max(1, step), 3)
    return model, {**stats, "final_train_loss": round(loss, 4)}


@torch.no_grad()
def position_loss(model: Transformer, val_ids: torch.Tensor, seq: int, limit: int = 0) -> torch.Tensor:
    """Mean validation cross-entropy at each position (seq,), over the held-out windows (the first `limit`)."""
    model.eval()
    xs, ys = windows(val_ids, seq)
    if limit:
        xs, ys = xs[:limit], ys[:limit]
    total = torch.zeros(seq, dtype=torch.float64)
    for x, y in zip(xs, ys):  # one window at a time: (seq, vocab) logits stay small for large vocabularies
        logits = model(x[None]).logits[0]
        total += F.cross_entropy(logits.float(), y, reduction="none").double()
    model.train()
    return total / len(xs)


def run(kind: str, seed: int, train_ids, val_ids, vocab: int, args) -> dict:
    model, stats = train(kind, seed, train_ids, vocab, args)
    began = time.perf_counter()
    per_position = position_loss(model, val_ids, args.seq, args.val_windows)
    stats["eval_seconds"] = round(time.perf_counter() - began, 1)
    spans = buckets(args.seq)
    return {
        "bench": "long_text",
        "data": Path(corpus_path(args.data)).name,
        "kind": kind,
        "seed": seed,
        "seq": args.seq,
        "window": args.window,
        "mode": "seconds" if args.seconds else "steps",
        "curriculum": args.curriculum,
        "buckets": [list(b) for b in spans],
        "bucket_loss": [round(float(per_position[a:b].mean()), 4) for a, b in spans],
        "val_loss": round(float(per_position.mean()), 4),
        "val_windows": min(args.val_windows or len(val_ids), (len(val_ids) - 1) // args.seq),
        **stats,
        "tokens_per_step": max(1, args.tokens // args.seq) * args.seq,
        "threads": torch.get_num_threads(),
    }


def summary(rows: list[dict], kind: str, key=lambda r: r["bucket_loss"]) -> tuple[list, list, list]:
    """Mean, min and max over seeds of key(row) (a list per bucket) for one kind."""
    values = torch.tensor([key(r) for r in rows if r["kind"] == kind], dtype=torch.float64)
    return values.mean(0).tolist(), values.min(0).values.tolist(), values.max(0).values.tolist()


def sparse_gaps(rows: list[dict], kind: str) -> list[list[float]]:
    """Per seed, the kind's bucket losses minus its dense baseline's (same seed: same data order)."""
    dense = {r["seed"]: r["bucket_loss"] for r in rows if r["kind"] == BASELINE[kind]}
    return [[a - b for a, b in zip(r["bucket_loss"], dense[r["seed"]])] for r in rows if r["kind"] == kind]


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in KINDS if any(r["kind"] == k for r in rows)]
    spans = rows[0]["buckets"]
    labels = [f"{a}–{b}" for a, b in spans]
    xs = torch.arange(len(spans), dtype=torch.float64)
    colors = dict(zip(KINDS, plt.get_cmap("tab10").colors))
    markers = dict(zip(KINDS, "osD^v<PXh>*p"))
    seeds = sorted({r["seed"] for r in rows})
    gapped = [k for k in kinds if k in BASELINE and BASELINE[k] in kinds]
    fig, axes = plt.subplots(1, 2 if gapped else 1, figsize=(13 if gapped else 7, 6), squeeze=False)
    ax = axes[0][0]
    for i, kind in enumerate(kinds):
        mean, low, high = summary(rows, kind)
        x = xs + 0.04 * (i - (len(kinds) - 1) / 2)  # a small offset keeps the bars apart
        overall = summary(rows, kind, key=lambda r: [r["val_loss"]])[0][0]
        ax.errorbar(x, mean, yerr=[[m - lo for m, lo in zip(mean, low)], [h - m for m, h in zip(mean, high)]],
                    linestyle="--" if kind in BASELINE else "-", marker=markers[kind], color=colors[kind],
                    capsize=3, label=f"{kind} ({overall:.3f})")  # fmt: skip
    ax.set_xticks(xs.tolist(), labels)
    ax.set_xlabel(f"position in the context (tokens; windows of {rows[0]['seq']})")
    ax.set_ylabel("validation loss (nats / char)")
    ax.set_title("Validation loss by position (legend: overall)")
    ax.grid(alpha=0.3)
    below = dict(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=9)  # off the lines
    ax.legend(**below)
    if gapped:
        ax = axes[0][1]
        for i, kind in enumerate(gapped):
            gaps = torch.tensor(sparse_gaps(rows, kind), dtype=torch.float64)
            mean, low, high = gaps.mean(0), gaps.min(0).values, gaps.max(0).values
            x = xs + 0.04 * (i - (len(gapped) - 1) / 2)
            ax.errorbar(x.tolist(), mean.tolist(), yerr=[(mean - low).tolist(), (high - mean).tolist()],
                        linestyle="--", marker=markers[kind], color=colors[kind], capsize=3,
                        label=f"{kind} − {BASELINE[kind]}")  # fmt: skip
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(xs.tolist(), labels)
        ax.set_xlabel("position in the context (tokens)")
        ax.set_ylabel("loss − dense baseline of its family (nats / char)")
        ax.set_title("Sparse minus dense, same seed (above 0: worse)")
        ax.grid(alpha=0.3)
        ax.legend(**below)
    r = rows[0]
    what = f"{r['steps']} steps" if r["mode"] == "steps" else "equal wall time"
    what += " (length curriculum)" if r.get("curriculum") else ""
    fig.suptitle(
        f"Far context on real text: {r['data']}, char-level, {what}, "
        f"{r['tokens_per_step']} tokens/step, seeds {','.join(map(str, seeds))} (bars: min–max over seeds)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--data", default="shakespeare", help="a bundled corpus name (shakespeare, tang) or a text file")
    p.add_argument("--seq", type=int, default=2048, help="context length of the training and validation windows")
    p.add_argument("--steps", type=int, default=200, help="training steps per kind and seed")
    p.add_argument("--seconds", type=float, default=0.0, help="train each kind this long instead of --steps")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch = tokens / seq)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lr-warmup", type=int, default=30, help="steps of linear learning-rate warm-up")
    p.add_argument("--warmup-fraction", type=float, default=0.5, help="dsa, csa, v4: dense warm-up share")
    p.add_argument("--curriculum", action="store_true", help="train at seq/16, then seq/4, then seq (every kind)")
    p.add_argument("--window", type=int, default=32, help="sliding window of sliding, nsa, csa, hca")
    p.add_argument("--val-windows", type=int, default=0, help="score the first N held-out windows (0: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="also write the JSON lines here")
    p.add_argument("--plot", default=None, help="PNG: loss by position per kind, and sparse minus dense")
    args = p.parse_args(argv)
    args.kinds = args.kinds.split(",")
    unknown = [k for k in args.kinds if k not in KINDS]
    if unknown:
        p.error(f"--kinds: unknown {unknown[0]!r}; choose from {', '.join(KINDS)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds: {args.seeds!r} is not a comma-separated list of integers")
    for name in ("seq", "steps", "tokens", "lr_warmup", "window", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")
    if args.seconds < 0 or args.val_windows < 0 or not 0 <= args.warmup_fraction < 1:
        p.error("--seconds and --val-windows must be >= 0, --warmup-fraction in [0, 1)")
    if not Path(corpus_path(args.data)).is_file():
        p.error(f"--data: {args.data!r} is neither a bundled corpus (shakespeare, tang) nor a file")
    return args


def main(argv=None) -> list[dict]:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    train_ids, val_ids, vocab = load_text(args.data)
    for part, ids in (("training", train_ids), ("held-out", val_ids)):
        if len(ids) <= args.seq:
            print(f"--seq: {args.seq} is longer than the {part} text ({len(ids)} characters)", file=sys.stderr)
            sys.exit(2)
    rows = []
    for seed in args.seeds:  # seed-major: each finished seed is a complete comparison
        for kind in args.kinds:
            rows.append(run(kind, seed, train_ids, val_ids, vocab, args))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if args.plot:
        plot(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
