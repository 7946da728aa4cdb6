"""`nanoseek ablate`: variants keyed by their whole resolved config (a changed budget reruns, an
unchanged finished one is skipped, an interrupted one resumes), a report that says what was compared
and on what machine, and curves with points whatever the budget."""

from __future__ import annotations

import contextlib
import json
import subprocess

import pytest

from nanoseek.cli import main as cli_main
from nanoseek.errors import NanoseekError
from nanoseek.train.ablate import ablate, parse_variant

VARIANTS = ["res:model.fusion=residual", "dwa:model.fusion=dwa"]


@pytest.fixture
def runs(monkeypatch):
    """Each variant's `nanoseek train` runs in this process (the same command, without a new interpreter)."""
    calls = []

    def run(cmd, stdout=None, env=None):
        calls.append(cmd[3:])
        with contextlib.redirect_stdout(stdout):
            return subprocess.CompletedProcess(cmd, cli_main(cmd[3:]))

    monkeypatch.setattr("nanoseek.train.ablate.subprocess.run", run)
    return calls


def common(corpus, steps: int) -> dict:
    return {
        "data.path": [str(corpus)], "data.seq_len": 16, "train.batch_size": 2, "train.max_steps": steps,
        "eval.batches": 1, "eval.batch_size": 2, "log.progress": False, "log.plot": False, "train.threads": 1,
    }  # fmt: skip


def test_a_variant_overrides_what_all_share():
    from pathlib import Path

    from nanoseek.train.ablate import resolve

    cfg = resolve(parse_variant("optim.lr=2e-3"), "gpt2-tiny", {"optim.lr": 1e-4, "train.max_steps": 7}, Path("x"))
    assert cfg.optim.lr == 2e-3 and cfg.train.max_steps == 7 and cfg.eval.points == 10


def test_parse_variant():
    dwa = parse_variant("dwa:model.fusion=dwa,optim.lr=2e-3")
    assert (dwa.name, dwa.overrides, dwa.preset) == ("dwa", {"model.fusion": "dwa", "optim.lr": 2e-3}, None)
    assert parse_variant("gpt2-tiny").preset == "gpt2-tiny"
    with pytest.raises(NanoseekError, match="variant name"):
        parse_variant("..:model.fusion=dwa")


def test_ablate_reruns_what_changed_and_only_that(tmp_path, runs):
    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 200)
    out = tmp_path / "abl"
    report = ablate(VARIANTS, common(corpus, 4), out, preset="llama-tiny")
    assert len(runs) == 2
    text = report.read_text()
    assert '| res | model.fusion="residual" | max_steps=4 | 1337 |' in text
    assert "machine:" in text and "threads" in text and "torch" in text
    rows = json.loads((out / "ablation.json").read_text())["variants"]
    assert all(r["steps"] == 4 and r["evaluations"] >= 4 for r in rows)  # a curve, not a dot
    assert (out / "ablation.png").stat().st_size > 2000

    ablate(VARIANTS, common(corpus, 4), out, preset="llama-tiny")  # the same configs, finished: skipped
    assert len(runs) == 2

    ablate(VARIANTS, common(corpus, 5), out, preset="llama-tiny")  # a new budget: both again, from scratch
    assert len(runs) == 4 and "--resume" not in runs[-1]
    assert all(r["steps"] == 5 for r in json.loads((out / "ablation.json").read_text())["variants"])

    (out / "dwa" / "summary.json").unlink()  # as if stopped after its checkpoint: resumed, the other skipped
    ablate(VARIANTS, common(corpus, 5), out, preset="llama-tiny")
    assert len(runs) == 5 and runs[-1][-1] == "--resume" and "dwa" in runs[-1][-2]


def test_ablate_cli_takes_the_shared_flags(tmp_path, runs, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 200)
    argv = ["ablate", "--out", str(tmp_path / "abl"), "--preset", "gpt2-tiny", "--variant", "model.hidden_size=32"]
    argv += ["--max-steps", "2", "--threads", "1", f"--data.path={json.dumps([str(corpus)])}", "--data.seq_len=16"]
    argv += ["--eval.batches=1", "--log.progress=false", "--log.plot=false", "--json"]
    assert cli_main(argv) == 0
    (row,) = map(json.loads, capsys.readouterr().out.splitlines())
    assert row["variant"] == "hidden_size=32" and row["budget"] == "max_steps=2" and row["machine"]["threads"] == 1


@pytest.mark.slow
def test_a_variant_trains_in_its_own_process(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 200)
    report = ablate(["model.hidden_size=32"], common(corpus, 2), tmp_path / "abl", preset="gpt2-tiny")
    assert "| hidden_size=32 |" in report.read_text()
