"""`nanoseek ablate`: train K variants with the same data, seed, budget and evaluation, then compare.

A variant is a preset name (`gpt2-mini`) or comma-separated overrides (`model.fusion=dwa,optim.lr=2e-3`),
optionally named with `name:` in front (`dwa:model.fusion=dwa`). Each variant's config is resolved
here (base preset < the overrides common to all < the variant's own) and written to
OUT/variants/<name>.json; the variant then runs as one ordinary `nanoseek train
OUT/variants/<name>.json` in its own process (so its peak memory is its own), into OUT/<name>/.

That resolved config is the variant's key. On a second call, a variant whose key is unchanged and
whose run finished is skipped; one with a checkpoint but no summary is resumed (an interrupted
ablation continues where it stopped); one whose key changed (a new budget, lr, seed, ...) is
trained again from scratch (`nanoseek train --overwrite`: its old run's files go). Without an
explicit `eval.every`, each variant evaluates at `EVAL_POINTS` evenly spaced fractions of its
budget (`eval.points`), so every curve has points whatever the budget.

At the end OUT/ablation.md holds what was compared (each variant's overrides, budget and seed, the
machine) and the table (final and best validation loss, tokens/s, parameters, peak memory, wall
time), OUT/ablation.json the same as data, and OUT/ablation.png the validation-loss curves.

    nanoseek ablate --out runs/fusion --preset deepseek-v3-mini --train.max_tokens=400000 \\
        --variant model.fusion=residual --variant model.fusion=dwa --variant model.fusion=mhc
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nanoseek.config import TrainConfig, build_train_config, parse_value
from nanoseek.config.presets import ALIASES, PRESETS
from nanoseek.device import machine
from nanoseek.errors import NanoseekError
from nanoseek.train.run_folder import BUDGETS, finished_summary

EVAL_POINTS = 10  # evaluations per variant when eval.every is not given

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]*")


@dataclass
class Variant:
    name: str  # its folder under OUT
    spec: str  # as the user wrote it
    preset: str | None  # a preset variant
    overrides: dict  # "section.field" -> value

    def describe(self) -> str:
        """The variant's own settings, for the report."""
        if self.preset:
            return f"preset {self.preset}"
        return ", ".join(f"{k}={json.dumps(v)}" for k, v in self.overrides.items())


def parse_variant(spec: str) -> Variant:
    """One --variant: `[NAME:]PRESET` or `[NAME:]section.field=value,...`."""
    head, sep, tail = spec.partition(":")
    name, body = (head, tail) if sep and "=" not in head else ("", spec)
    preset, overrides = None, {}
    if body in PRESETS or body in ALIASES:
        preset = body
    else:
        for item in filter(None, body.split(",")):
            if "=" not in item:
                raise NanoseekError(f"variant {spec!r}: {item!r} is neither a preset nor section.field=value")
            key, value = item.split("=", 1)
            overrides[key.strip()] = parse_value(value.strip())
        if not overrides:
            raise NanoseekError(f"variant {spec!r} is empty")
    slug = name or re.sub(r"[^A-Za-z0-9._=+-]+", "_", body.replace("model.", "").replace(",", "+"))
    if not _NAME.fullmatch(slug):
        raise NanoseekError(f"variant name {slug!r}: use letters, digits and . _ = + - (name it with NAME:spec)")
    return Variant(slug, spec, preset, overrides)


def resolve(variant: Variant, preset: str | None, common: dict, run_dir: Path) -> TrainConfig:
    """The variant's whole config: base preset (or the variant's) < the overrides common to all < the
    variant's own, evaluating at EVAL_POINTS fractions of the budget unless a cadence is given."""
    overrides = {**common, **variant.overrides}
    if "eval.every" not in overrides and "eval.points" not in overrides:
        overrides["eval.points"] = EVAL_POINTS
    return build_train_config(None, variant.preset or preset, {**overrides, "out": str(run_dir)})


def config_key(cfg: TrainConfig) -> dict:
    """What makes two runs the same run: the whole config but its output folder."""
    return {k: v for k, v in cfg.to_dict().items() if k != "out"}


def changed_fields(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names whose values differ, `name old -> new`."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_fields(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {json.dumps(a)} -> {json.dumps(b)}")
    return out


def note(text: str) -> None:
    print(f"[ablate] {text}", file=sys.stderr, flush=True)


def run_variant(variant: Variant, cfg: TrainConfig, out: Path) -> dict:
    """Train `variant` unless OUT already holds its finished run with the same config; its summary."""
    run_dir, key_file = Path(cfg.out), out / "variants" / f"{variant.name}.json"
    key = config_key(cfg)
    old = json.loads(key_file.read_text()) if key_file.is_file() else None
    done_before = finished_summary(run_dir) if old == key else None
    if done_before is not None:
        note(f"{variant.name}: finished with this config; skipped")
        return done_before
    resume = old == key and (run_dir / "LATEST").is_file()
    if not resume and (run_dir / "train_config.json").is_file():  # an older config, or a start without checkpoint
        why = "; ".join(changed_fields(old, key)[:4]) if old else "its config is unknown"
        note(f"{variant.name}: config changed ({why}); training it again from scratch")
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_text(json.dumps(key, indent=2))  # the config file the run trains with
    cmd = [sys.executable, "-m", "nanoseek", "train", str(key_file), "--out", str(run_dir)]
    cmd.append("--resume" if resume else "--overwrite")  # --overwrite: the old run's files go, others stay
    note(f"{variant.name}: {' '.join(cmd[3:])}")
    t0 = time.perf_counter()
    done = subprocess.run(cmd, stdout=sys.stderr, env=same_package_env())  # stdout: the ablation's own result
    if done.returncode != 0:
        raise NanoseekError(
            f"variant {variant.name} failed (exit {done.returncode}); rerun `nanoseek ablate` with the "
            f"same arguments to resume it"
        )
    summary_file = run_dir / "summary.json"
    result = json.loads(summary_file.read_text())
    result.setdefault("wall_s", round(time.perf_counter() - t0, 1))
    result["machine"] = machine(cfg.train.threads)
    summary_file.write_text(json.dumps(result, indent=2))
    return result


def same_package_env() -> dict:
    """The environment of a variant's process: this one's, with this nanoseek first on the path (a
    checkout run without installing trains its variants with its own code)."""
    here = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def budget_text(cfg: TrainConfig) -> str:
    """'max_seconds=30' (the limits that are set; the first reached ends the run)."""
    limits = [f"{b}={getattr(cfg.train, b):g}" for b in BUDGETS if getattr(cfg.train, b)]
    return ", ".join(limits)


def machine_text(record: dict | None) -> str:
    if not record:
        return "—"
    text = f"{record['cpu']}, {record['threads']} threads, torch {record['torch']}"
    return text + (f", {record['gpu']}" if record.get("gpu") else "")


def table_row(variant: Variant, cfg: TrainConfig, result: dict, records: list[dict]) -> dict:
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:] or [0.0]
    return {
        "variant": variant.name,
        "overrides": variant.describe(),
        "budget": budget_text(cfg),
        "seed": cfg.train.seed,
        "final_val_loss": result.get("val_loss"),
        "best_val_loss": min(vals) if vals else None,
        "evaluations": len(vals),
        "tokens_per_s": sum(speeds) / len(speeds),
        "params": result.get("params_total"),
        "peak_rss_mib": result.get("peak_rss_mib"),
        "wall_s": result.get("wall_s"),
        "tokens": result.get("tokens"),
        "steps": result.get("step"),
        "machine": result.get("machine"),
    }


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def report_text(rows: list[dict], preset: str | None, common: dict) -> str:
    """ablation.md: what was compared, on what, and the table."""
    machines = {machine_text(r["machine"]) for r in rows}
    shared = ", ".join(f"{k}={json.dumps(v)}" for k, v in common.items()) or "none"
    lines = [
        "# Ablation",
        "",
        f"- base preset: {preset or 'each variant’s, else the default'}; overrides for every variant: {shared}",
        "- each variant's budget ends its `nanoseek train` run (wall-clock budgets count the whole command); "
        "same data, seed and evaluation batches for all",
    ]
    if len(machines) == 1:
        lines.append(f"- machine: {machines.pop()}")
    else:
        lines += [f"- machine of {r['variant']}: {machine_text(r['machine'])}" for r in rows]
    lines += [
        "",
        "| variant | overrides | budget | seed | final val loss | best val loss | evals | tokens/s | params "
        "| peak RSS MiB | wall s | tokens | steps |",
        "|" + "---|" * 13,
    ]
    for r in rows:
        cells = [
            r["variant"],
            r["overrides"],
            r["budget"],
            str(r["seed"]),
            _fmt(r["final_val_loss"], ".4f"),
            _fmt(r["best_val_loss"], ".4f"),
            str(r["evaluations"]),
            _fmt(r["tokens_per_s"], ",.0f"),
            _fmt(r["params"], ","),
            _fmt(r["peak_rss_mib"], ".0f"),
            _fmt(r["wall_s"], ".0f"),
            _fmt(r["tokens"], ","),
            _fmt(r["steps"], ","),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(rows: list[dict], out: Path, curves: dict[str, list[dict]], preset, common: dict) -> Path:
    (out / "ablation.md").write_text(report_text(rows, preset, common))
    (out / "ablation.json").write_text(json.dumps({"preset": preset, "common": common, "variants": rows}, indent=2))
    budgets = sorted({r["budget"] for r in rows})
    plot_curves(curves, out / "ablation.png", f"equal budget: {' / '.join(budgets)}")
    return out / "ablation.md"


def plot_curves(curves: dict[str, list[dict]], path: Path, subtitle: str = ""):
    """Validation loss against training tokens, one coloured line per variant; the training loss of
    the same variant faint behind it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^v<>p"  # curves that coincide stay told apart by their markers
    for i, (name, records) in enumerate(curves.items()):
        color, marker = colors[i % len(colors)], markers[i % len(markers)]
        train = [(r["tokens"], r["loss"]) for r in records if "loss" in r and "tokens" in r]
        val = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r and "tokens" in r]
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.25, linewidth=1)
        if val:
            ax.plot(*zip(*val), f"{marker}-", color=color, label=name, markersize=5, linewidth=2, alpha=0.85)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("validation loss (lines with points); training loss (faint)" + (f"\n{subtitle}" if subtitle else ""))
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1e6:g}M" if x >= 1e6 else f"{x / 1e3:g}K"))
    if curves:
        ax.legend(title="variant")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ablate(variants: list[str], common: dict, out: str | Path, preset: str | None = None) -> Path:
    """Train every variant (or reuse its finished run), then write the report; its path.

    `common`: overrides ("section.field" -> value) for every variant; `preset`: their base preset."""
    if len(variants) < 1:
        raise NanoseekError("give at least one --variant")
    out = Path(out)
    parsed = [parse_variant(v) for v in variants]
    names = [v.name for v in parsed]
    if len(set(names)) != len(names):
        raise NanoseekError(f"variant names repeat: {names}; name them with NAME:spec")
    configs = [resolve(v, preset, common, out / v.name) for v in parsed]  # every config checked before training
    out.mkdir(parents=True, exist_ok=True)
    rows, curves = [], {}
    for variant, cfg in zip(parsed, configs):
        result = run_variant(variant, cfg, out)
        records = read_metrics(out / variant.name)
        rows.append(table_row(variant, cfg, result, records))
        curves[variant.name] = _with_tokens(records)
    return write_report(rows, out, curves, preset, common)


def _with_tokens(records: list[dict]) -> list[dict]:
    """Give eval records the token count of the training step they follow."""
    tokens_at = {r["step"]: r["tokens"] for r in records if "tokens" in r}
    per_step = max((t / s for s, t in tokens_at.items() if s), default=0)
    return [{**r, "tokens": tokens_at.get(r["step"], r["step"] * per_step)} for r in records]
