"""What a run records: `OUT/metrics.jsonl` (one JSON object per logged step and per evaluation) and
`OUT/loss.png` (train and validation loss against the step).

    {"step": 10, "loss": 3.91, "lr": 0.001, "tokens_per_s": 41000.0, "grad_norm": 1.2, ...}
    {"step": 250, "val_loss": 2.05, "val_perplexity": 7.77, "val_bits_per_byte": 2.96}

On resume the log is cut back to the steps the checkpoint had seen, so a resumed run's file reads
as if it had never stopped; a line a kill cut short (the last one) is dropped with a note, and the
shortened log replaces the old one atomically.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from nanoseek.data.files import atomic_write_text
from nanoseek.train.evaluate import EvalResult


def eval_record(step: int, result: EvalResult) -> dict:
    """The metrics.jsonl line of a validation pass."""
    return {
        "step": step,
        "val_loss": result.loss,
        "val_perplexity": result.perplexity,
        "val_bits_per_byte": result.bits_per_byte,
    }


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; lines that are not JSON objects (cut short by a kill) are skipped."""
    records, torn = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if isinstance(rec, dict):
            records.append(rec)
        elif line.strip():
            torn += 1
    if torn:
        print(f"{path}: dropped {torn} unreadable line(s) (a write cut short)", file=sys.stderr)
    return records


class MetricsLog:
    """metrics.jsonl, truncated on resume to what the checkpoint had seen."""

    def __init__(self, path: Path | None, resume_step: int | None):
        self.path = path  # None: a rank other than 0 keeps records in memory only
        self.records: list[dict] = []
        if path is None:
            return
        if resume_step is not None and path.is_file():
            records = read_records(path)
            self.records = [r for r in records if r.get("step", 0) <= resume_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: dict):
        self.records.append(record)
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def plot_losses(records: list[dict], path: Path, title: str = ""):
    """loss.png: the train loss of every logged step and the validation loss of every evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train", alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
