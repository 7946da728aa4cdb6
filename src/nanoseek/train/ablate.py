"""`nanoseek ablate`: train K variants with the same data, seed, budget and evaluation, then compare.

A variant is a preset name (`gpt2-small`) or comma-separated overrides (`model.fusion=dwa,optim.lr=2e-3`),
optionally named with `name:` in front (`dwa:model.fusion=dwa`). Every variant is one ordinary
`nanoseek train` run in its own process (so its peak memory is its own), into OUT/<name>/. A variant
whose run finished (its summary.json names a budget) is skipped; one with a checkpoint but no
summary is resumed (`--resume`); any other is started over (`--overwrite`); so an interrupted
ablation continues where it stopped. At the end OUT/ablation.md holds the table (final
and best validation loss, tokens/s, parameters, peak memory, wall time) and OUT/ablation.png every
validation-loss curve.

    nanoseek ablate --out runs/fusion --preset deepseek-v3-mini --train.max_tokens=400000 \\
        --variant model.fusion=residual --variant model.fusion=dwa --variant model.fusion=mhc
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from nanoseek.config.presets import PRESETS
from nanoseek.errors import NanoseekError
from nanoseek.train.run_folder import finished_summary


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """(name, train-command arguments) of one variant spec."""
    head, sep, tail = spec.partition(":")
    name, body = (head, tail) if sep and "=" not in head else ("", spec)
    args: list[str] = []
    if body in PRESETS:
        args = ["--preset", body]
    else:
        for item in filter(None, body.split(",")):
            if "=" not in item:
                raise NanoseekError(f"variant {spec!r}: {item!r} is neither a preset nor section.field=value")
            key, value = item.split("=", 1)
            args.append(f"--{key.strip()}={value.strip()}")
    if not args:
        raise NanoseekError(f"variant {spec!r} is empty")
    slug = name or re.sub(r"[^A-Za-z0-9._=-]+", "_", body.replace("model.", "").replace(",", "+"))
    return slug, args


def run_variant(name: str, args: list[str], common: list[str], out: Path) -> dict:
    run_dir = out / name
    summary = run_dir / "summary.json"
    finished = finished_summary(run_dir)
    if finished is not None:
        return finished  # skip
    cmd = [sys.executable, "-m", "nanoseek", "train", *common, *args, "--out", str(run_dir)]
    cmd.append("--resume" if (run_dir / "LATEST").is_file() else "--overwrite")  # a run without a checkpoint
    print(f"[ablate] {name}: {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd)
    if done.returncode != 0:
        raise NanoseekError(
            f"variant {name} failed (exit {done.returncode}); rerun `nanoseek ablate` with the "
            f"same arguments to resume it"
        )
    result = json.loads(summary.read_text())
    result.setdefault("wall_s", round(time.perf_counter() - t0, 1))
    summary.write_text(json.dumps(result, indent=2))
    return result


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def table_row(name: str, result: dict, records: list[dict]) -> dict:
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:] or [0.0]
    return {
        "variant": name,
        "final_val_loss": result.get("val_loss"),
        "best_val_loss": min(vals) if vals else None,
        "tokens_per_s": sum(speeds) / len(speeds),
        "params": result.get("params_total"),
        "peak_rss_mib": result.get("peak_rss_mib"),
        "wall_s": result.get("wall_s"),
        "tokens": result.get("tokens"),
        "steps": result.get("step"),
    }


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def write_report(rows: list[dict], out: Path, curves: dict[str, list[dict]]) -> Path:
    header = "| variant | final val loss | best val loss | tokens/s | params | peak RSS MiB | wall s | tokens |"
    lines = [header, "|" + "---|" * 8]
    for r in rows:
        cells = [
            _fmt(r["final_val_loss"], ".4f"),
            _fmt(r["best_val_loss"], ".4f"),
            _fmt(r["tokens_per_s"], ",.0f"),
            _fmt(r["params"], ","),
            _fmt(r["peak_rss_mib"], ".0f"),
            _fmt(r["wall_s"], ".0f"),
            _fmt(r["tokens"], ","),
        ]
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    (out / "ablation.json").write_text(json.dumps(rows, indent=2))
    plot_curves(curves, out / "ablation.png")
    return out / "ablation.md"


def plot_curves(curves: dict[str, list[dict]], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, records in curves.items():
        points = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r and "tokens" in r]
        if points:
            ax.plot(*zip(*points), "o-", label=name, markersize=3)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ablate(variants: list[str], common: list[str], out: str | Path) -> Path:
    if len(variants) < 1:
        raise NanoseekError("give at least one --variant")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parsed = [parse_variant(v) for v in variants]
    names = [n for n, _ in parsed]
    if len(set(names)) != len(names):
        raise NanoseekError(f"variant names repeat: {names}; name them with NAME:spec")
    rows, curves = [], {}
    for name, args in parsed:
        result = run_variant(name, args, common, out)
        records = read_metrics(out / name)
        rows.append(table_row(name, result, records))
        curves[name] = _with_tokens(records)
    return write_report(rows, out, curves)


def _with_tokens(records: list[dict]) -> list[dict]:
    """Give eval records the token count of the training step they follow."""
    tokens_at = {r["step"]: r["tokens"] for r in records if "tokens" in r}
    per_step = max((t / s for s, t in tokens_at.items() if s), default=0)
    return [{**r, "tokens": tokens_at.get(r["step"], r["step"] * per_step)} for r in records]
