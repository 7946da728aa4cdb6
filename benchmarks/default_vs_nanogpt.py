"""The default `nanoseek train` against nanoGPT's CPU recipe at equal whole-process wall time.

1. `benchmarks/nanogpt_recipe.py` (nanoGPT's shakespeare_char CPU command on nanoseek's reference GPT) runs
   as a process of its own; its wall time T is measured from the process start to the line saying training
   (and nanoGPT's own periodic estimates) is done.
2. `nanoseek train` with no model or data arguments runs as a process of its own with `--train.max_seconds`
   set so that the whole process (start-up, data preparation, training, final checkpoint and evaluation)
   lasts T as well.
3. Both are scored the same way, untimed: the loss on the held-out end of tiny Shakespeare (nanoseek's
   validation split: the last 10% of its tokens) in non-overlapping windows of each model's own context,
   in bits per byte. nanoGPT holds out its last 10% of chars; it is scored on the same bytes as nanoseek
   (for a subword tokenizer a few bytes fewer: the end of nanoGPT's split).

Writes OUT/default_vs_nanogpt.jsonl (one line per run and a summary) and OUT/default_vs_nanogpt.png
(validation bits/byte against seconds since the process started, both runs; the held-out scores as stars).

    python benchmarks/default_vs_nanogpt.py --threads 2 --out benchmarks/out/default_vs_nanogpt
    python benchmarks/default_vs_nanogpt.py --iters 100 --out /tmp/smoke          # a smoke test (~20 s)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


def child_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    return env


def run_recipe(iters: int, threads: int, losses: Path) -> dict:
    """nanoGPT's recipe in its own process: its estimates (seconds since the process started), its wall time
    to the end of training and its held-out loss (each char's in `losses`)."""
    cmd = [sys.executable, str(HERE / "nanogpt_recipe.py"), "--iters", str(iters), "--threads", str(threads)]
    cmd += ["--losses-out", str(losses)]
    start_wall, start = time.time(), time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=child_env(threads))
    curve, trained, held = [], None, None
    for line in proc.stdout:
        record = json.loads(line)
        if record["event"] == "eval":
            curve.append((record["time"] - start_wall, record["val_loss"] / math.log(2)))
        elif record["event"] == "trained":
            trained, wall = record, time.perf_counter() - start
        elif record["event"] == "held_out":
            held = record
    if proc.wait() != 0 or trained is None or held is None:
        raise SystemExit(f"nanogpt_recipe.py failed (exit {proc.returncode})")
    return {
        "run": "nanoGPT CPU recipe (reference GPT 4L/4H/128, ctx 64, batch 12)",
        "wall_s": round(wall, 1),
        "steps": iters,
        "tokens": iters * 12 * 64,
        "curve": [(round(t, 1), round(b, 4)) for t, b in curve],
        "held_out_bits_per_byte": held["val_bits_per_byte"],
    }


def import_seconds(threads: int) -> float:
    """What a `nanoseek train` process spends before its own clock starts (interpreter, torch, nanoseek)."""
    start = time.perf_counter()
    code = "import nanoseek.cli, nanoseek.train.loop"
    subprocess.run([sys.executable, "-c", code], check=True, env=child_env(threads))
    return time.perf_counter() - start


def run_nanoseek(out: Path, seconds: float, threads: int, overrides: list[str]) -> dict:
    """The default `nanoseek train` in its own process, its training budget `seconds`; then `nanoseek eval`."""
    run_dir = out / "nanoseek_run"
    cli = [sys.executable, "-m", "nanoseek"]
    train = [*cli, "train", "--out", str(run_dir), "--overwrite", f"--train.max_seconds={seconds:.1f}"]
    train += [f"--train.threads={threads}", "--log.progress=false", *(f"--{o}" for o in overrides)]
    start = time.perf_counter()
    subprocess.run(train, check=True, env=child_env(threads), stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    offset = wall - summary["elapsed_s"]  # before the run's own clock: the process start-up
    logged = sorted((r["step"], r["elapsed_s"]) for r in records if "elapsed_s" in r)

    def seconds_at(step: int) -> float:  # the last logged training step at or before an evaluation
        return max((s for st, s in logged if st <= step), default=0.0) + offset

    curve = [(round(seconds_at(r["step"]), 1), round(r["val_bits_per_byte"], 4)) for r in records if "val_loss" in r]
    scored = subprocess.run(
        [*cli, "eval", str(run_dir), "--json", "--threads", str(threads)],
        check=True,
        capture_output=True,
        text=True,
        env=child_env(threads),
    )
    held = json.loads(scored.stdout)
    return {
        "run": "nanoseek train (default: " + (", ".join(overrides) or "no arguments") + ")",
        "wall_s": round(wall, 1),
        "steps": summary["step"],
        "tokens": summary["tokens"],
        "params": summary["params_total"],
        "curve": curve,
        "held_out_bits_per_byte": round(held["bits_per_byte"], 4),
        "held_out_bytes": held["bytes"],
    }


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for run, color in zip(runs, ("tab:gray", "tab:blue")):
        t, b = zip(*run["curve"]) if run["curve"] else ((), ())
        ax.plot(t, b, "o-", color=color, label=f"{run['run']}: validation estimates", markersize=4)
        ax.plot(
            [run["wall_s"]],
            [run["held_out_bits_per_byte"]],
            "*",
            color=color,
            markersize=14,
            label=f"held-out bytes after {run['wall_s']:.0f} s: {run['held_out_bits_per_byte']:.3f} bits/byte",
        )
    ax.set_xlabel("seconds since the process started")
    ax.set_ylabel("validation bits per byte")
    ax.set_ylim(top=min(5.0, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper right")
    ax.set_title("tiny Shakespeare: equal whole-process wall time, scored on the same held-out bytes", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=2000, help="nanoGPT recipe iterations (its published 2000)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/out/default_vs_nanogpt")
    p.add_argument("--override", action="append", default=[], help="KEY=VALUE for the nanoseek run (default: none)")
    p.add_argument("--nanogpt-json", help="reuse the nanoGPT line of an earlier OUT/default_vs_nanogpt.jsonl")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    losses = out / "nanogpt_held_out_losses.npy"
    if args.nanogpt_json:  # an earlier run's recipe line, its per-char losses beside it
        recipe = json.loads(Path(args.nanogpt_json).read_text().splitlines()[0])
        losses = Path(args.nanogpt_json).parent / losses.name
    else:
        recipe = run_recipe(args.iters, args.threads, losses)
    budget = max(recipe["wall_s"] - import_seconds(args.threads), 1.0)
    ours = run_nanoseek(out, budget, args.threads, args.override)
    # The same bytes for both: nanoseek's split holds out the corpus's last tokens, which for a subword
    # tokenizer are a few bytes fewer than nanoGPT's last 10% of chars; score nanoGPT on those bytes only.
    per_char = np.load(losses)
    recipe["held_out_bytes"] = min(ours["held_out_bytes"], len(per_char))
    recipe["held_out_bits_per_byte"] = round(float(per_char[-recipe["held_out_bytes"] :].mean()) / math.log(2), 4)
    print(json.dumps(recipe), flush=True)
    print(json.dumps(ours), flush=True)
    gain = 1 - ours["held_out_bits_per_byte"] / recipe["held_out_bits_per_byte"]
    summary = {"summary": True, "threads": args.threads, "bits_per_byte_lower_by": round(gain, 4)}
    print(json.dumps(summary), flush=True)
    with open(out / "default_vs_nanogpt.jsonl", "w") as f:
        for record in (recipe, ours, summary):
            f.write(json.dumps(record) + "\n")
    plot([recipe, ours], out / "default_vs_nanogpt.png")


if __name__ == "__main__":
    main()
