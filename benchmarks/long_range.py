"""Long-range quality: key-value retrieval across 1K+ tokens at 2K, dense vs each sparse kind.

A sequence of 2N tokens (N = 1024) holds filler tokens (64 kinds) and, at random positions in its
first quarter, four key-value facts written as one token each: value v (of 16) of key a (of 4) is
token 64 + 16a + v. The second half is all queries: token 128 + a asks for key a's value, and the
target at that position is the fact token of key a. Every second-half position is scored (N
targets per sequence); the answer lies 512 to 2,047 tokens back. Chance is 1/16 (1/64 for a model
that has not learned which fact belongs to which key). The same small model (2 layers, width 128,
4 heads) trains for the same number of steps in each attention kind, 4,096 tokens per step, on a
length curriculum (sequences of N/8 tokens for 40% of the steps, N/2 for 30%, then 2N; the scored
model is the last one, tested at 2N). The windows (32) are shorter than the first phase's distances
(facts to queries: 32 to 127 tokens), so from the first step a sparse kind must reach back through
its long-range path:

    dense      full causal MLA (the MLA baseline)
    sliding    MLA, a window of 32 keys: two layers relay at most 62 tokens, the answer is at least
               513 back at 2N; out of reach by design
    dsa        MLA + lightning indexer, 128 keys per query; the first --warmup-fraction of the steps
               train densely (the whole model, the indexer by its KL loss beside it: there is no
               trained dense model to start from, as V3.2 had), then sparse
    dense-mha  MHA (4 heads of 32) with full attention, NSA's baseline
    nsa        MHA + NSA: blocks of 32, 8 selected blocks per query block, window 32
    nsa-token  the same NSA with a selection per query (nsa_query_group=1, as the NSA paper) instead of
               one shared by the 32 queries of a block
    dense-v4   DeepSeek-V4 attention (one shared K=V head of 64, sinks) with no window
    csa        V4 + window 32 + compressed entries (rate 4), the indexer picks 64 per query
               (dense first, as dsa: every visible entry)
    hca        V4 + window 32 + every compressed entry (rate 128)
    v4         the V4 mix: layer 0 csa, layer 1 hca (the released models alternate them)

    python benchmarks/long_range.py [--steps 200] [--kinds dense,sliding,...] [--seeds 0,1,2]
        [--eval-every 100] [--threads 2] [--plot long_range.png]
    python benchmarks/long_range.py --replot a.jsonl b.jsonl --plot long_range.png

Prints one JSON line per kind and seed: accuracy over 8 fresh sequences, steps, seconds per step
(training only), final loss, and the curve [step, training seconds, accuracy] (every --eval-every
steps and at the end), from which both comparisons come: at equal steps and at equal wall time.
For the kinds that choose keys per query (dsa, nsa, nsa-token) also `coverage`: on the same
sequences, the share of queries whose fact was among the keys some layer let them see (its window,
selected blocks or picks; per layer too), and the accuracy where it was seen and where it was
missed: whether the kind's errors come from its selection.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from nanoseek import ModelConfig, Transformer

KINDS = ("dense", "sliding", "dsa", "dense-mha", "nsa", "nsa-token", "dense-v4", "csa", "hca", "v4")


FILLER, KEYS, VALUES = 64, 4, 16
NSA_SHAPE = {"block": 32, "topn": 8}  # --nsa-block, --nsa-topn
VOCAB = FILLER + KEYS * VALUES + KEYS


def make_batch(batch: int, n: int, g: torch.Generator):
    x = torch.randint(0, FILLER, (batch, 2 * n), generator=g)
    values = torch.randint(0, VALUES, (batch, KEYS), generator=g)
    facts = FILLER + VALUES * torch.arange(KEYS) + values  # (B, KEYS) fact tokens
    where = torch.rand(batch, n // 2, generator=g).argsort(dim=1)[:, :KEYS]  # distinct, first quarter
    x.scatter_(1, where, facts)
    asked = torch.randint(0, KEYS, (batch, n), generator=g)
    x[:, n:] = FILLER + KEYS * VALUES + asked
    y = torch.full_like(x, -1)
    y[:, n:] = facts.gather(1, asked)
    return x, y


def config(kind: str, n: int) -> ModelConfig:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=2 * n,
        ffn="swiglu",
        attention="mla",
        q_lora_rank=64,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
    )
    if kind == "sliding":
        base.update(sparse="sliding", sliding_window=32)
    if kind == "dsa":
        base.update(sparse="dsa", index_topk=128, index_n_heads=4, index_head_dim=32)
    if kind in ("nsa", "nsa-token", "dense-mha"):
        base.update(attention="mha", rope_interleave=False)
    if kind in ("nsa", "nsa-token"):
        base.update(sparse="nsa", nsa_block=NSA_SHAPE["block"], nsa_topn=NSA_SHAPE["topn"], sliding_window=32)
    if kind == "nsa-token":
        base.update(nsa_query_group=1)
    if kind in ("dense-v4", "csa", "hca", "v4"):
        base.update(
            attention="v4",
            head_dim=64,
            qk_rope_head_dim=16,
            o_groups=2,
            o_lora_rank=64,
            sparse={"dense-v4": "dense", "v4": "csa"}.get(kind, kind),
            sparse_layers=["csa", "hca"] if kind == "v4" else None,
            sliding_window=32,
            compress_rate_csa=4,
            compress_rate_hca=128,
            index_topk=64,
            index_n_heads=4,
            index_head_dim=32,
        )
    return ModelConfig(**base)


@torch.no_grad()
def accuracy(model, n: int, batches: int = 4, batch: int = 2) -> float:
    model.eval()
    g = torch.Generator().manual_seed(12345)
    hits = total = 0
    for _ in range(batches):
        x, y = make_batch(batch, n, g)
        pred = model(x).logits.argmax(-1)
        hits += int(((pred == y) & (y >= 0)).sum())
        total += int((y >= 0).sum())
    model.train()
    return hits / total


SELECTING = ("dsa", "nsa", "nsa-token")  # kinds that choose tokens per query: their coverage is measured


@torch.no_grad()
def selection_coverage(model, n: int, batches: int = 4, batch: int = 2) -> dict:
    """Whether each scored query's fact was among the keys its layers let it see (the window, NSA's
    selected blocks, DSA's picks: `attention_map`'s allowed keys), on `accuracy`'s sequences: the share
    seen by some layer and by each layer, and the accuracy on queries whose fact was seen / missed.
    A kind that answers right only where its selection found the fact loses accuracy to selection."""
    from nanoseek.analysis.attention import attention_maps

    model.eval()
    g = torch.Generator().manual_seed(12345)
    seen_by_layer, right, seen_any = [[] for _ in model.layers], [], []
    for _ in range(batches):
        x, y = make_batch(batch, n, g)
        pred = model(x).logits.argmax(-1)
        for b in range(batch):
            asked = (y[b] >= 0).nonzero().flatten()
            fact_at = {int(tok): int(pos) for pos, tok in enumerate(x[b, : n // 2].tolist()) if tok >= FILLER}
            facts = torch.tensor([fact_at[int(y[b, t])] for t in asked])
            layers = [attention_maps(model, x[b : b + 1], i)[1][asked, facts] for i in range(len(model.layers))]
            for i, seen in enumerate(layers):
                seen_by_layer[i].append(seen)
            seen_any.append(torch.stack(layers).any(0))
            right.append(pred[b, asked] == y[b, asked])
    model.train()
    seen, right = torch.cat(seen_any), torch.cat(right)

    def share(mask) -> float | None:
        return round(float(mask.float().mean()), 4) if mask.numel() else None

    return {
        "fact_seen": share(seen),
        "fact_seen_by_layer": [share(torch.cat(s)) for s in seen_by_layer],
        "accuracy_when_seen": share(right[seen]),
        "accuracy_when_missed": share(right[~seen]),
    }


def curriculum(step: int, steps: int, n: int) -> int:
    """Half-length n/16 for the first 40% of the steps, n/4 for the next 30%, then n."""
    if step < 0.4 * steps:
        return max(8, n // 16)
    return max(8, n // 4) if step < 0.7 * steps else n


def train_step(model, opt, x, y, **forward) -> float:
    """One optimizer step on the loss plus every trainable auxiliary loss (DSA's indexer), gradients
    clipped to norm 1, then the MoE balance update; returns the loss."""
    out = model(x, targets=y, **forward)
    total = out.loss + sum(v for v in out.aux.values() if v.requires_grad)
    opt.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    model.update_balance_bias(out.expert_load)
    return out.loss.item()


def run(
    kind: str, steps: int, n: int, tokens: int, lr: float, warmup_fraction: float, seed: int = 0, eval_every: int = 0
) -> dict:
    """Train one model of `kind`; its accuracy at 2N at the end and, with eval_every, every eval_every steps
    (curve: [step, training seconds so far, accuracy]; evaluation time is not counted as training time)."""
    torch.manual_seed(seed)
    model = Transformer(config(kind, n)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(seed)
    warmup = int(warmup_fraction * steps) if kind in ("dsa", "csa", "v4") else 0
    wall, loss, curve = 0.0, float("nan"), []
    for step in range(steps):
        start = time.perf_counter()
        model.set_dsa_warmup(step < warmup, freeze_model=False)  # from scratch: all of it trains densely
        for group in opt.param_groups:  # linear warm-up, then constant
            group["lr"] = lr * min(1.0, (step + 1) / 30)
        length = curriculum(step, steps, n)
        x, y = make_batch(max(1, tokens // (2 * length)), length, g)
        loss = train_step(model, opt, x, y)
        wall += time.perf_counter() - start
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            model.set_dsa_warmup(False)  # scored as it will be used: sparse
            curve.append([step + 1, round(wall, 2), round(accuracy(model, n), 4)])
            print(
                f"{kind} seed {seed}: step {step + 1}/{steps}, {wall:.0f} s, loss {loss:.3f}, "
                f"accuracy {curve[-1][2]:.1%}",
                file=sys.stderr,
                flush=True,
            )  # progress
    model.set_dsa_warmup(False)
    final = round(accuracy(model, n), 4)
    curve.append([steps, round(wall, 2), final])
    return {
        "bench": "long_range",
        "kind": kind,
        "seed": seed,
        "seq": 2 * n,
        "accuracy": final,
        "chance": round(1 / VALUES, 4),
        "steps": steps,
        "tokens_per_step": tokens,
        "seconds_per_step": round(wall / steps, 3),
        "final_train_loss": round(loss, 4),
        "curve": curve,
        **({"nsa_block": NSA_SHAPE["block"], "nsa_topn": NSA_SHAPE["topn"]} if kind.startswith("nsa") else {}),
        **({"coverage": selection_coverage(model, n)} if kind in SELECTING else {}),
        "threads": torch.get_num_threads(),
    }


def plot_curves(rows: list[dict], path: str) -> None:
    """Accuracy at 2N against training steps and against training seconds, per kind (mean over seeds,
    the seeds' min-max shaded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def label(r: dict) -> str:  # the kind, and NSA's shape where it is not the default
        shape = (r.get("nsa_block", 32), r.get("nsa_topn", 8))
        return r["kind"] if shape == (32, 8) else f"{r['kind']} l={shape[0]} n={shape[1]}"

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for i, kind in enumerate(dict.fromkeys(label(r) for r in rows)):
        runs = [r["curve"] for r in rows if label(r) == kind]
        points = min(len(c) for c in runs)
        acc = torch.tensor([[p[2] for p in c[:points]] for c in runs]) * 100
        steps = [p[0] for p in runs[0][:points]]
        secs = torch.tensor([[p[1] for p in c[:points]] for c in runs]).mean(0).tolist()
        style = "-" if kind.startswith("dense") else "--"
        for ax, x in zip(axes, (steps, secs)):
            ax.plot(x, acc.mean(0).tolist(), style, marker="o", ms=3, color=f"C{i}", label=f"{kind} ({len(runs)})")
            if len(runs) > 1:
                ax.fill_between(x, acc.min(0).values.tolist(), acc.max(0).values.tolist(), color=f"C{i}", alpha=0.15)
    for ax, label in zip(axes, ("training steps", "training seconds (mean over seeds)")):
        ax.axhline(100 / VALUES, color="grey", lw=0.8, ls=":", label="chance")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("recall accuracy at 2,048 tokens (%)")
    axes[0].set_title("equal steps")
    axes[1].set_title("equal wall time")
    axes[1].legend(title="kind (seeds; band: min–max)", fontsize=8, title_fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps per kind")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; one model per kind and seed")
    parser.add_argument("--n", type=int, default=1024, help="half the sequence length")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch = tokens / length)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup-fraction", type=float, default=0.5, help="dsa, csa, v4: dense warm-up share")
    parser.add_argument("--nsa-block", type=int, default=32, help="nsa kinds: block length l")
    parser.add_argument("--nsa-topn", type=int, default=8, help="nsa kinds: blocks selected per query (group)")
    parser.add_argument("--eval-every", type=int, default=0, help="also score every this many steps (the curve)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--plot", help="PNG of accuracy vs steps and vs seconds, from this run's lines")
    parser.add_argument("--replot", nargs="*", default=[], help="JSON-lines files to plot instead of running")
    args = parser.parse_args(argv)
    if args.replot:
        rows = [json.loads(line) for f in args.replot for line in open(f) if line.strip()]
        rows = [r for r in rows if "curve" in r]
        plot_curves(rows, args.plot or "long_range.png")
        return rows
    if args.threads:
        torch.set_num_threads(args.threads)
    NSA_SHAPE.update(block=args.nsa_block, topn=args.nsa_topn)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds={args.seeds!r}: comma-separated integers")
    rows = []
    for kind in args.kinds.split(","):
        if kind not in KINDS:
            parser.error(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")
        for seed in seeds:
            row = run(kind, args.steps, args.n, args.tokens, args.lr, args.warmup_fraction, seed, args.eval_every)
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    if args.plot:
        plot_curves(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
