"""Mean and seed spread of `nanoseek ablate` runs whose variants are named NAME-sSEED.

Reads each ablation folder's run folders (OUT/NAME-sSEED/metrics.jsonl), groups the variants by NAME,
and writes:
    --jsonl   one line per run: group, name, seed, final and best validation loss, params, the
              validation curve [[tokens, val_loss], ...] (small: kept with the results)
    --png     one panel per folder: the mean validation loss of each group against training tokens,
              the band from the lowest to the highest seed
    stdout    a Markdown table: final validation loss, mean ± half the range (max − min) / 2, min, max, and
              with --baseline the difference to the baseline group of the same corpus and seed (same data
              order and validation batches), its mean and its range over the seeds

    python benchmarks/plot_seeds.py runs/schedules/tinyshakespeare runs/schedules/tang_poems \\
        --png benchmarks/schedules.png --jsonl benchmarks/out/schedules.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import textwrap
from collections import defaultdict
from pathlib import Path

SEEDED = re.compile(r"^(?P<name>.+)-s(?P<seed>\d+)$")


def read_runs(folder: Path) -> list[dict]:
    """One dict per NAME-sSEED run folder of an ablation folder, in the ablation's order."""
    report = json.loads((folder / "ablation.json").read_text()) if (folder / "ablation.json").is_file() else {}
    order = [row["variant"] for row in report.get("variants", [])]
    params = {row["variant"]: row.get("params") for row in report.get("variants", [])}
    names = order or sorted(p.name for p in folder.iterdir() if (p / "metrics.jsonl").is_file())
    runs = []
    for variant in names:
        match = SEEDED.match(variant)
        metrics = folder / variant / "metrics.jsonl"
        if not match or not metrics.is_file():
            continue
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        tokens_at = {r["step"]: r["tokens"] for r in records if "tokens" in r}
        per_step = max((t / s for s, t in tokens_at.items() if s), default=0)  # for steps with no train record
        curve = [[tokens_at.get(r["step"], r["step"] * per_step), r["val_loss"]] for r in records if "val_loss" in r]
        if not curve:
            continue
        summary = folder / variant / "summary.json"
        final = json.loads(summary.read_text()).get("val_loss") if summary.is_file() else curve[-1][1]
        runs.append(
            {
                "corpus": folder.name,
                "group": match["name"],
                "name": variant,
                "seed": int(match["seed"]),
                "final_val_loss": final,
                "best_val_loss": min(v for _, v in curve),
                "params": params.get(variant),
                "val_curve": curve,
            }
        )
    return runs


def table(runs: list[dict], baseline: str = "") -> str:
    by = defaultdict(list)
    for r in runs:
        by[(r["corpus"], r["group"])].append(r)
    base = {(r["corpus"], r["seed"]): r["final_val_loss"] for r in runs if r["group"] == baseline}
    lines = [
        "| corpus | variant | seeds | final val loss mean ± half-range | min | max | params |"
        + (f" vs {baseline}, same seed: mean [min, max] |" if baseline else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if baseline else ""),
    ]
    for (corpus, group), rs in by.items():
        finals = [r["final_val_loss"] for r in rs]
        lo, hi = min(finals), max(finals)
        params = sorted({r["params"] for r in rs if r["params"]})
        row = (
            f"| {corpus} | {group} | {len(rs)} | {sum(finals) / len(finals):.4f} ± {(hi - lo) / 2:.4f} "
            f"| {lo:.4f} | {hi:.4f} | {', '.join(f'{p:,}' for p in params) or '—'} |"
        )
        if baseline:
            deltas = [r["final_val_loss"] - base[(corpus, r["seed"])] for r in rs if (corpus, r["seed"]) in base]
            row += f" {sum(deltas) / len(deltas):+.4f} [{min(deltas):+.4f}, {max(deltas):+.4f}] |" if deltas else " — |"
        lines.append(row)
    return "\n".join(lines)


def plot(runs: list[dict], path: Path, title: str, zoom: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    corpora = list(dict.fromkeys(r["corpus"] for r in runs))
    groups = list(dict.fromkeys(r["group"] for r in runs))
    colors = dict(zip(groups, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    styles = dict(zip(groups, [("o", "-"), ("s", "--"), ("D", "-."), ("^", ":"), ("v", "-")] * 4))
    fig, axes = plt.subplots(1, len(corpora), figsize=(max(9, 7 * len(corpora)), 5), squeeze=False)
    for ax, corpus in zip(axes[0], corpora):
        lows = []
        for group in groups:
            curves = [r["val_curve"] for r in runs if r["corpus"] == corpus and r["group"] == group]
            if not curves:
                continue
            n = min(len(c) for c in curves)  # the evaluations every seed has
            xs = [curves[0][i][0] for i in range(n)]
            ys = [[c[i][1] for c in curves] for i in range(n)]
            mean = [sum(y) / len(y) for y in ys]
            finals = [c[n - 1][1] for c in curves]
            label = f"{group}: {mean[-1]:.3f} ± {(max(finals) - min(finals)) / 2:.3f} ({len(curves)} seeds)"
            marker, line = styles[group]  # curves that coincide stay told apart
            ax.plot(xs, mean, marker=marker, ls=line, color=colors[group], ms=4, lw=1.6, label=label)
            ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=colors[group], alpha=0.18)
            lows.append(min(min(y) for y in ys))
        if lows and zoom:
            ax.set_ylim(min(lows) - 0.02, min(lows) + zoom)  # the early evaluations sit far above the end
        ax.set_title(corpus)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("validation loss (nats/token)")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1e3:g}K"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="final: mean ± half-range")
    fig.suptitle(textwrap.fill(title, int(9 * fig.get_figwidth())))  # ~9 characters an inch
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="`nanoseek ablate --out` folders")
    p.add_argument("--png", type=Path, required=True)
    p.add_argument("--jsonl", type=Path, required=True)
    p.add_argument("--title", default="validation loss: mean of the seeds, band from lowest to highest")
    p.add_argument("--baseline", default="", help="a group to compare every group with, seed by seed")
    p.add_argument("--zoom", type=float, default=0.6, help="y-range above the lowest point (0: the whole curve)")
    args = p.parse_args()
    runs = [r for folder in args.folders for r in read_runs(folder)]
    if not runs:
        raise SystemExit("no NAME-sSEED runs with validation points in " + ", ".join(map(str, args.folders)))
    args.jsonl.parent.mkdir(parents=True, exist_ok=True)
    args.jsonl.write_text("".join(json.dumps(r) + "\n" for r in runs))
    plot(runs, args.png, args.title, args.zoom)
    print(table(runs, args.baseline))
    print(f"\nwrote {args.jsonl} and {args.png}")


if __name__ == "__main__":
    main()
