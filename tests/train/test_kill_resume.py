"""kill -9 at a random moment, then --resume: the latest checkpoint always loads and the resumed run
ends with the losses and weights of an uninterrupted one, bit for bit.

Each trial starts `nanoseek train` in a subprocess (a checkpoint every 2 steps) and SIGKILLs it at a
moment drawn from its seed: while a save is being written (the first one, or any), after a random
number of logged steps plus a random delay, or at a random time after the start (setup included).
Two trials run by default; `pytest -m slow tests/train/test_kill_resume.py` runs 50.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanoseek import load_model
from nanoseek.cli import main as cli_main
from nanoseek.io import checkpoint as ckpt_io

STEPS = 12
MODES = ("first_save", "any_save", "after_steps", "any_time")


def train_argv(corpus: str, out: Path) -> list[str]:
    return [
        "train", "--preset", "gpt2-tiny", "--data", corpus, "--out", str(out), "--max-steps", str(STEPS),
        "--data.seq_len=32", "--train.batch_size=4", "--train.threads=1", "--eval.every=5", "--eval.batches=1",
        "--eval.batch_size=4", "--checkpoint.every=2", "--checkpoint.keep_last=2", "--log.every=1",
        "--log.progress=false", "--log.plot=false", "--schedule.warmup_steps=3",
    ]  # fmt: skip


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_model(out).state_dict()


@pytest.fixture(scope="module")
def reference(small_corpus, tmp_path_factory):
    """The uninterrupted run: its metrics (timings dropped) and weights."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert cli_main(train_argv(small_corpus, out)) == 0
    return comparable(metrics(out)), weights(out)


def comparable(records: list[dict]) -> list[dict]:
    """Metrics without what depends on the clock."""
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in records]


def saving(out: Path) -> bool:
    root = out / "checkpoints"
    try:
        return any(name.startswith(".step-") for name in os.listdir(root))
    except FileNotFoundError:
        return False


def logged_lines(out: Path) -> int:
    try:
        return (out / "metrics.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def kill_at_random(argv: list[str], out: Path, rng: random.Random, mode: str) -> None:
    """Run `nanoseek train` and SIGKILL it at the moment `mode` and `rng` pick (or let it end)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanoseek", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    target_lines = rng.randint(0, STEPS + 1)
    delay = rng.uniform(0.0, 0.03)
    start, deadline = time.monotonic(), time.monotonic() + 120
    when = rng.uniform(0.5, 4.0)
    saves_seen, target_save = 0, 1 if mode == "first_save" else rng.randint(1, STEPS // 2)
    was_saving = False
    while proc.poll() is None and time.monotonic() < deadline:
        if mode in ("first_save", "any_save"):
            now_saving = saving(out)
            saves_seen += now_saving and not was_saving
            was_saving = now_saving
            if now_saving and saves_seen >= target_save:
                break
        elif mode == "after_steps" and logged_lines(out) >= target_lines:
            time.sleep(delay)
            break
        elif mode == "any_time" and time.monotonic() - start >= when:
            break
        time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def one_trial(seed: int, corpus: str, tmp_path: Path, reference) -> None:
    rng = random.Random(seed)
    mode = MODES[seed % len(MODES)]
    out = tmp_path / "run"
    argv = train_argv(corpus, out)
    kill_at_random(argv, out, rng, mode)
    latest = ckpt_io.latest_checkpoint(out) if out.is_dir() else None
    if latest is not None:  # whatever moment the kill came, the checkpoint --resume will use is whole
        load_model(latest)
        ckpt_io.load_training_state(latest)
    assert cli_main(argv + ["--resume"]) == 0, f"seed {seed} ({mode})"
    ref_metrics, ref_weights = reference
    assert comparable(metrics(out)) == ref_metrics, f"seed {seed} ({mode})"
    for name, tensor in weights(out).items():
        assert torch.equal(tensor, ref_weights[name]), f"seed {seed} ({mode}): {name}"
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert json.loads((out / "summary.json").read_text())["step"] == STEPS


@pytest.mark.parametrize("seed", [0, 2])  # a kill during the first save; after a random step
def test_kill_9_at_a_random_moment_then_resume_matches_an_uninterrupted_run(seed, small_corpus, tmp_path, reference):
    one_trial(seed, small_corpus, tmp_path, reference)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3, 53))
def test_kill_9_trials(seed, small_corpus, tmp_path, reference):
    one_trial(seed, small_corpus, tmp_path, reference)
