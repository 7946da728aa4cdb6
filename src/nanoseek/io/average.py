"""Checkpoint averaging: the mean of each weight over a run's last K checkpoints, as a new checkpoint.

    theta_avg = (1 / K) sum_k theta_k        (summed in float64, stored in each tensor's own dtype)

Vaswani et al. 2017 evaluate the base model with the average of its last 5 checkpoints (written 10 minutes
apart): the average sits nearer the middle of the region the last steps wander in than any one of them.
The checkpoints must hold the same model (config.json); integer tensors must agree and are kept as they
are. The new folder holds config.json, model.safetensors, the tokenizer and a train_state.json naming the
checkpoints it averages (and the run's config, so `nanoseek eval` finds the run's held-out data); it is
written beside, then renamed into place, so it appears complete or not at all.

A run keeps its last `checkpoint.keep_last` checkpoints (the `vaswani-*-ed` presets keep 5).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from nanoseek.data.files import publish_dir
from nanoseek.errors import NanoseekError
from nanoseek.io.checkpoint import CONFIG_FILE, MODEL_FILE, STATE_FILE, TOKENIZER_FILE, read_json, read_safetensors


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run folder, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        raise NanoseekError(f"{run_dir} is not a run folder (it has no checkpoints/ folder)")
    return sorted(p for p in root.glob("step-*") if (p / CONFIG_FILE).is_file() and (p / MODEL_FILE).is_file())


def mean_state(folders: list[Path]) -> dict[str, torch.Tensor]:
    """The element-wise mean of every floating tensor of the folders' model.safetensors (integers: equal)."""
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for folder in folders:
        state = read_safetensors(folder / MODEL_FILE)
        if total and set(state) != set(total):
            raise NanoseekError(f"{folder / MODEL_FILE} holds other tensors than {folders[0] / MODEL_FILE}")
        for name, tensor in state.items():
            if name not in total:
                dtypes[name] = tensor.dtype
                total[name] = tensor.double() if tensor.is_floating_point() else tensor
            elif tensor.is_floating_point():
                total[name] += tensor.double()
            elif not torch.equal(total[name], tensor):
                raise NanoseekError(f"{folder / MODEL_FILE}: integer tensor {name!r} differs between checkpoints")
    return {name: (t / len(folders)).to(dtypes[name]) if t.is_floating_point() else t for name, t in total.items()}


def average_checkpoints(run_dir: str | Path, last: int, out: str | Path | None = None) -> Path:
    """Average the last `last` checkpoints of the run in `run_dir` into `out` (default RUN/average-last-K)."""
    if last < 1:
        raise NanoseekError(f"--last={last} must be >= 1")
    found = run_checkpoints(run_dir)
    if len(found) < last:
        raise NanoseekError(
            f"{run_dir} holds {len(found)} checkpoint(s), fewer than --last={last}; train with "
            f"--checkpoint.keep_last={last} (and --checkpoint.every small enough) to keep them"
        )
    chosen = found[-last:]
    configs = [read_json(f / CONFIG_FILE) for f in chosen]
    if any(c != configs[-1] for c in configs):
        raise NanoseekError(f"the last {last} checkpoints of {run_dir} hold different models (config.json differs)")
    state = mean_state(chosen)
    latest = chosen[-1]
    saved = read_json(latest / STATE_FILE) if (latest / STATE_FILE).is_file() else {}
    out = Path(out) if out is not None else Path(run_dir) / f"average-last-{last}"
    record = {"averaged": [f.name for f in chosen], "step": saved.get("step"), "config": saved.get("config", {})}
    with publish_dir(out) as tmp:
        shutil.copy(latest / CONFIG_FILE, tmp / CONFIG_FILE)
        save_file(state, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        if (latest / TOKENIZER_FILE).is_file():
            shutil.copy(latest / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(record, indent=2))
    return out
