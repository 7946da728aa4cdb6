"""Stress test of the learning rate: a fixed cosine schedule against the same schedule with the spike guard.

Two stresses, each trained twice (cosine, cosine + schedule.spike_guard) with the same seed and data:
    high_lr   the peak learning rate is --lr-mult times the normal one (default 10x)
    corrupt   every --corrupt-every steps the batch is replaced by a corrupt one (--corrupt-kind:
              one token repeated, or uniformly random tokens), at the normal learning rate
Writes OUT/lr_stress.jsonl (one line per run: final and best validation loss, spikes, divergence,
the train-loss curve) and OUT/lr_stress.png (train loss against step, spikes marked).

    python benchmarks/lr_stress.py --out runs/lr_stress                  # the full run (~3 min, alone)
    python benchmarks/lr_stress.py --out /tmp/s --steps 20 --eval-every 10   # a smoke test
    python benchmarks/lr_stress.py --out runs/lr_stress --replot             # redraw the figure only
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from unittest import mock

try:
    import nanoseek  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from nanoseek.config import build_train_config
from nanoseek.data.shards import BatchLoader
from nanoseek.train import loop
from nanoseek.train.metrics import read_records


class CorruptingLoader(BatchLoader):
    """Every `every`-th batch is corrupt: one token repeated ("constant", a shard of padding or a
    decoding error) or uniformly random tokens ("random", binary junk)."""

    every = 0
    vocab = 0
    kind = "constant"

    def next(self):
        x, y = super().next()
        self._served = getattr(self, "_served", 0) + 1
        if self.every and self._served % self.every == 0:
            g = torch.Generator().manual_seed(self._served)
            if self.kind == "constant":
                token = int(torch.randint(0, self.vocab, (), generator=g))
                x, y = torch.full_like(x, token), torch.full_like(y, token)
            else:
                x = torch.randint(0, self.vocab, x.shape, generator=g)
                y = torch.randint(0, self.vocab, y.shape, generator=g)
        return x, y


def run_one(args, stress: str, variant: str, out: Path) -> dict:
    lr = args.lr * (args.lr_mult if stress == "high_lr" else 1.0)
    overrides = {
        "optim.lr": lr,
        "optim.grad_clip": args.grad_clip,
        "schedule.name": "cosine",
        "schedule.warmup_steps": args.warmup,
        "schedule.spike_guard": variant == "guard",
        "train.max_steps": args.steps,
        "train.max_seconds": 0,  # the schedule follows the steps alone, not a preset's wall-clock budget
        "train.max_tokens": 0,
        "train.batch_size": args.batch,
        "train.seed": args.seed,
        "train.threads": args.threads,
        "data.seq_len": args.seq_len,
        "eval.every": args.eval_every,
        "eval.batches": args.eval_batches,
        "checkpoint.every": 0,
        "log.every": 1,
        "log.progress": False,
        "log.plot": False,
        "out": str(out),
    }
    if args.data:
        overrides["data.path"] = [args.data]
    cfg = build_train_config(preset=args.preset, overrides=overrides)
    CorruptingLoader.every = args.corrupt_every if stress == "corrupt" else 0
    CorruptingLoader.vocab = 0
    CorruptingLoader.kind = args.corrupt_kind
    diverged = None
    with mock.patch.object(loop, "BatchLoader", CorruptingLoader):
        original = loop.setup_data

        def setup_data(cfg_, out_):  # learn the vocabulary size for the random tokens
            tok, data = original(cfg_, out_)
            CorruptingLoader.vocab = tok.vocab_size
            return tok, data

        with mock.patch.object(loop, "setup_data", setup_data):
            try:
                summary = loop.train(cfg, quiet=True, overwrite=True)
            except loop.TrainingDiverged as e:
                summary, diverged = {}, str(e)
    records = read_records(out / "metrics.jsonl")
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    return {
        "stress": stress,
        "variant": variant,
        "lr": lr,
        "grad_clip": args.grad_clip,
        "seed": args.seed,
        "preset": args.preset,
        "corrupt_kind": args.corrupt_kind if stress == "corrupt" else None,
        "steps": args.steps,
        "final_val_loss": summary.get("val_loss"),
        "best_val_loss": min(vals) if vals else None,
        "diverged": diverged,
        "spikes": [r["step"] for r in records if r.get("event") == "spike"],
        "curve": [[r["step"], r["loss"]] for r in records if "loss" in r],
        "val_curve": [[r["step"], r["val_loss"]] for r in records if "val_loss" in r],
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stresses = sorted({r["stress"] for r in rows})
    fig, axes = plt.subplots(1, len(stresses), figsize=(6.5 * len(stresses), 4.5), squeeze=False)
    colors = {"cosine": "tab:red", "guard": "tab:blue"}
    for ax, stress in zip(axes[0], stresses):
        for r in (r for r in rows if r["stress"] == stress):
            steps, losses = zip(*r["curve"]) if r["curve"] else ((), ())
            label = f"{r['variant']} (final val {r['final_val_loss']:.3f})" if r["final_val_loss"] else r["variant"]
            if r["diverged"]:
                label += ", diverged"
            ax.plot(steps, losses, color=colors[r["variant"]], lw=0.8, alpha=0.85, label=label)
            if r["val_curve"]:
                ax.plot(*zip(*r["val_curve"]), "o--", color=colors[r["variant"]], ms=3, lw=1)
            lookup = dict(map(tuple, r["curve"]))
            if r["spikes"]:
                ys = [lookup.get(s, float("nan")) for s in r["spikes"]]
                ax.scatter(r["spikes"], ys, marker="x", color="black", s=25, zorder=3, label="spike-guard events")
        ax.set_title(f"{stress}: peak lr {next(r['lr'] for r in rows if r['stress'] == stress):g}")
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (nats/token); dots: validation")
        # room for the spikes the guard caught (its markers), else the corrupt batches' peaks stay cut off
        caught = [loss for r in rows if r["stress"] == stress for s, loss in r["curve"] if s in set(r["spikes"])]
        start = max((r["curve"][0][1] for r in rows if r["curve"]), default=10)
        ax.set_ylim(top=min(ax.get_ylim()[1], max([2 * start, *(1.05 * y for y in caught)])))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    clip = rows[0].get("grad_clip")
    clip_text = "no gradient clipping" if clip == 0 else f"gradient clipped at norm {clip:g}"
    fig.suptitle(f"{rows[0]['preset']}: fixed cosine vs cosine + spike guard\nseed {rows[0]['seed']}, {clip_text}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/lr_stress")
    p.add_argument("--preset", default="deepseek-v3-mini")
    p.add_argument("--data", default="", help="a text file (default: the bundled tiny Shakespeare)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3, help="the normal peak learning rate (deepseek-v3-mini's)")
    p.add_argument("--lr-mult", type=float, default=10.0, help="high_lr: this many times --lr")
    p.add_argument("--corrupt-every", type=int, default=50, help="corrupt: one random batch every this many")
    p.add_argument("--corrupt-kind", choices=("constant", "random"), default="constant")
    p.add_argument("--grad-clip", type=float, default=1.0, help="optim.grad_clip (0 = off)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=10)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stress", default="high_lr,corrupt")
    p.add_argument("--replot", action="store_true", help="only redraw OUT/lr_stress.png from OUT/lr_stress.jsonl")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.replot:
        plot([json.loads(line) for line in (out / "lr_stress.jsonl").read_text().splitlines()], out / "lr_stress.png")
        return
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(out / "lr_stress.jsonl", "w") as f:
        for stress in args.stress.split(","):
            for variant in ("cosine", "guard"):
                row = run_one(args, stress, variant, out / f"{stress}-{variant}")
                rows.append(row)
                f.write(json.dumps(row) + "\n")
                f.flush()
                print(
                    f"{stress:8s} {variant:6s} final val {row['final_val_loss']} best {row['best_val_loss']} "
                    f"spikes {len(row['spikes'])} diverged {bool(row['diverged'])}",
                    flush=True,
                )
    plot(rows, out / "lr_stress.png")
    print(f"wrote {out / 'lr_stress.jsonl'} and {out / 'lr_stress.png'}")


if __name__ == "__main__":
    main()
