"""A run folder belongs to one run.

`nanoseek train --out R` starts a run in R only when R holds none: an empty or new folder, or one
with files that no run wrote. A folder holding a run (its train_config.json, metrics.jsonl,
checkpoints/, ...) is continued with `--resume` or replaced with `--overwrite`; anything else is an
error, so a second run can never prune, truncate or mix with the first one's files.

`--overwrite` moves the old run's files into one hidden folder inside R (a rename each: a kill
half-way leaves part of the old run and no part of the new one, and the next attempt sees a run
again), then deletes that folder, then the new run starts. Files a run did not write are left alone.

A summary (summary.json) describes a finished command: it is removed when a run (fresh or resumed)
starts, so a stale one never describes a later state.
"""

from __future__ import annotations

import json
import secrets
import shutil
from pathlib import Path

from nanoseek.data.files import atomic_write_text
from nanoseek.errors import NanoseekError
from nanoseek.io.checkpoint import remove_stale_temporaries

RUN_CONFIG = "train_config.json"
SUMMARY = "summary.json"
# what a run writes into its folder, in the order --overwrite takes it away: the newest state
# first (LATEST and checkpoints), the run's config (what marks the folder as a run) last
RUN_FILES = ("LATEST", "checkpoints", SUMMARY, "loss.png", "metrics.jsonl", "tokenizer.json", RUN_CONFIG)
SHARDS = "data"  # token shards, when data.cache_dir does not put them elsewhere
SHARD_FILES = ("tokens.bin", "meta.json")
# what stopped a finished run (a summary's `stopped_by`); "interrupt" means it can continue
BUDGETS = ("max_steps", "max_tokens", "max_seconds")


def run_files(out: Path) -> list[str]:
    """The names under `out` that a run wrote (a shard folder only when it holds nothing else)."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    shards = out / SHARDS
    if shards.is_dir() and all(p.name in SHARD_FILES or p.name.startswith(".tokens.bin.") for p in shards.iterdir()):
        found.append(SHARDS)
    return found


def holds_run(out: Path) -> bool:
    return any(name != SHARDS for name in run_files(out))


def claim(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start a fresh run in a folder holding another; called before anything is written."""
    if resume and overwrite:
        raise NanoseekError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if out.exists() and not out.is_dir():
        raise NanoseekError(f"--out {out} is a file, not a folder")
    if resume or overwrite or not out.is_dir() or not holds_run(out):
        return
    found = ", ".join(name + ("/" if (out / name).is_dir() else "") for name in run_files(out))
    raise NanoseekError(
        f"{out} already holds a run ({found}): continue it with --resume, or start a new one there with "
        f"--overwrite (deletes that run's files), or choose another --out"
    )


def remove_run(out: Path) -> None:
    """Delete the run in `out` (see the module docstring); other files stay."""
    names = run_files(out)
    if not names:
        return
    trash = out / f".overwritten.{secrets.token_hex(4)}.tmp"
    trash.mkdir()
    for name in names:
        (out / name).rename(trash / name)
    shutil.rmtree(trash)


def prepare(out: Path, overwrite: bool, config_json: str) -> None:
    """Make `out` ready for the run `claim` allowed: the old run gone when overwriting, the leftovers of
    interrupted commands removed, and a fresh run's config written first (it marks the folder as taken)."""
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        remove_run(out)
    for stale in out.glob(".overwritten.*.tmp"):  # an --overwrite that was interrupted
        shutil.rmtree(stale, ignore_errors=True)
    for name in RUN_FILES:  # files whose atomic write was interrupted
        for stale in out.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
    remove_stale_temporaries(out)
    if not (out / RUN_CONFIG).exists():
        atomic_write_text(out / RUN_CONFIG, config_json)


def finished_summary(out: Path) -> dict | None:
    """The summary of a run in `out` that stopped at its budget; None when it has not finished."""
    try:
        summary = json.loads((out / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    # "budget": what summaries said before they named the limit
    if isinstance(summary, dict) and summary.get("stopped_by") in (*BUDGETS, "budget"):
        return summary
    return None
