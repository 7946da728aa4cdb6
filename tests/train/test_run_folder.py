"""A run folder belongs to one run, and nothing a run trained is ever lost: a second run into a
folder holding one is refused (or replaces it whole with --overwrite), checkpoints are pruned by step
number, a save killed half-way never stops --resume, the final checkpoint comes before the final
evaluation, and summaries say what happened."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from nanoseek import load_model
from nanoseek.cli import main as cli_main
from nanoseek.config import build_train_config
from nanoseek.errors import NanoseekError
from nanoseek.io import checkpoint as ckpt_io
from nanoseek.train import ablate, loop


def tiny_cfg(small_corpus, out, **overrides):
    base = {
        "data.path": [small_corpus],
        "data.seq_len": 32,
        "train.batch_size": 4,
        "train.max_steps": 8,
        "train.threads": 1,
        "eval.every": 0,
        "eval.batches": 1,
        "eval.batch_size": 4,
        "checkpoint.every": 2,
        "checkpoint.keep_last": 2,
        "log.every": 1,
        "log.progress": False,
        "log.plot": False,
        "schedule.warmup_steps": 3,
        "out": str(out),
    }
    base.update(overrides)
    return build_train_config(preset="gpt2-tiny", overrides=base)


def cli_run(small_corpus, out, *extra) -> list[str]:
    return [
        "train", "--preset", "gpt2-tiny", "--data", small_corpus, "--out", str(out), "--data.seq_len=32",
        "--train.batch_size=4", "--train.threads=1", "--eval.every=0", "--eval.batches=1", "--eval.batch_size=4",
        "--checkpoint.every=2", "--checkpoint.keep_last=2", "--log.every=1", "--log.progress=false",
        "--log.plot=false", "--schedule.warmup_steps=3", *extra,
    ]  # fmt: skip


def records(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def losses(out) -> list[float]:
    return [r["loss"] for r in records(out) if "loss" in r]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def same_weights(a, b) -> bool:
    return all(
        torch.equal(p, q) for p, q in zip(load_model(a).state_dict().values(), load_model(b).state_dict().values())
    )


# ------------------------------------------------------------------------------ one run per folder


def test_a_second_run_into_a_run_folder_is_refused_and_changes_nothing(small_corpus, tmp_path, capsys):
    run = tmp_path / "R"
    assert cli_main(cli_run(small_corpus, run, "--max-steps", "12")) == 0
    before = snapshot(run)
    capsys.readouterr()
    assert cli_main(cli_run(small_corpus, run, "--max-steps", "4")) == 2  # a shorter run into the same folder
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume" in err and "--overwrite" in err and "Traceback" not in err
    assert snapshot(run) == before
    assert ckpt_io.resolve_checkpoint(run).name == "step-0000012"


def test_overwrite_replaces_the_old_run_whole(small_corpus, tmp_path):
    run, fresh = tmp_path / "R", tmp_path / "fresh"
    assert cli_main(cli_run(small_corpus, run, "--max-steps", "12")) == 0
    (run / "notes.txt").write_text("mine")  # not a run's file: left alone
    (run / ".overwritten.0badcafe.tmp" / "checkpoints").mkdir(parents=True)  # an overwrite that was killed
    assert cli_main(cli_run(small_corpus, run, "--max-steps", "4", "--overwrite")) == 0
    assert cli_main(cli_run(small_corpus, fresh, "--max-steps", "4")) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    assert (run / "LATEST").read_text().strip() == "step-0000004"
    assert [r["step"] for r in records(run) if "loss" in r] == [1, 2, 3, 4]
    assert losses(run) == losses(fresh) and same_weights(run, fresh)
    assert (run / "notes.txt").read_text() == "mine"
    assert not list(run.glob(".*"))  # no temporaries left


def test_new_empty_or_foreign_folders_are_fine_and_flags_conflict(small_corpus, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "README").write_text("x")
    for name in ("new/sub", "empty", "foreign"):
        assert cli_main(cli_run(small_corpus, tmp_path / name, "--max-steps", "1")) == 0
    capsys.readouterr()
    assert cli_main(cli_run(small_corpus, tmp_path / "empty", "--resume", "--overwrite")) == 2
    assert "give one of them" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert cli_main(cli_run(small_corpus, tmp_path / "file", "--max-steps", "1")) == 2
    assert "is a file" in capsys.readouterr().err


def test_ablate_starts_over_a_variant_without_a_checkpoint_and_resumes_one_with(tmp_path, monkeypatch):
    commands = []

    class Done:
        returncode = 0

    def fake_run(cmd, **kwargs):
        commands.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        (out / "summary.json").write_text(json.dumps({"stopped_by": "max_steps", "step": 1}))
        return Done()

    monkeypatch.setattr(ablate.subprocess, "run", fake_run)
    variants = {}
    for name, files in {"a": ["train_config.json", "metrics.jsonl"], "b": ["train_config.json", "LATEST"]}.items():
        variant = ablate.parse_variant(f"{name}:model.hidden_size=32")
        cfg = ablate.resolve(variant, "gpt2-tiny", {}, tmp_path / name)
        variants[name] = (variant, cfg)
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_text("{}")
        (tmp_path / "variants").mkdir(exist_ok=True)  # both were started with this config before
        (tmp_path / "variants" / f"{name}.json").write_text(json.dumps(ablate.config_key(cfg)))
    ablate.run_variant(*variants["a"], tmp_path)
    ablate.run_variant(*variants["b"], tmp_path)
    assert commands[0][-1] == "--overwrite" and commands[1][-1] == "--resume"
    ablate.run_variant(*variants["a"], tmp_path)  # finished: not run again
    assert len(commands) == 2


# ------------------------------------------------------------------------------ checkpoints


def tiny_model():
    from nanoseek.model import Transformer

    return Transformer(build_train_config(preset="gpt2-tiny").model)


def test_pruning_keeps_the_highest_steps_by_number_not_by_name(tmp_path):
    model = tiny_model()
    for step in (9_999_999, 10_000_000, 10_000_001):  # by name, step-9999999 sorts last
        ckpt_io.save_checkpoint(tmp_path, step, model, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-10000000", "step-10000001"]
    assert ckpt_io.resolve_checkpoint(tmp_path).name == "step-10000001"


def test_latest_always_names_the_checkpoint_just_saved(tmp_path, monkeypatch):
    """A checkpoint of a higher step from an abandoned timeline (a kill between publishing a folder and
    replacing LATEST, then a resume from the one before) never outlives the newer save."""
    model = tiny_model()
    ckpt_io.save_checkpoint(tmp_path, 20, model, keep_last=1)
    seen = {}
    write = ckpt_io.atomic_write_text

    def spy(path, text):  # LATEST is replaced only once its folder is complete
        seen[text.strip()] = (Path(path).parent / "checkpoints" / text.strip() / "config.json").is_file()
        write(path, text)

    monkeypatch.setattr(ckpt_io, "atomic_write_text", spy)
    ckpt_io.save_checkpoint(tmp_path, 6, model, keep_last=1)
    assert seen == {"step-0000006": True}
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000006"]
    assert ckpt_io.resolve_checkpoint(tmp_path).name == "step-0000006"


def test_a_save_killed_during_the_first_checkpoint_does_not_stop_resume(small_corpus, tmp_path, capsys):
    run, fresh = tmp_path / "R", tmp_path / "fresh"
    loop.train(tiny_cfg(small_corpus, fresh), quiet=True)
    loop.train(tiny_cfg(small_corpus, run, **{"train.max_steps": 1, "checkpoint.every": 0}), quiet=True)
    for p in [run / "LATEST", run / "summary.json", *(run / "checkpoints").iterdir()]:
        p.unlink() if p.is_file() else shutil.rmtree(p)
    partial = run / "checkpoints" / ".step-0000002.0badcafe.tmp"  # what a kill -9 mid-save leaves
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(NanoseekError, match="without a complete checkpoint"):
        load_model(run)
    assert ckpt_io.latest_checkpoint(run) is None
    capsys.readouterr()
    assert cli_main(cli_run(small_corpus, run, "--max-steps", "8", "--resume")) == 0
    assert "starting from scratch" in capsys.readouterr().err
    assert losses(run) == losses(fresh) and same_weights(run, fresh)
    assert not partial.exists()


# ------------------------------------------------------------------------------ the end of a run


def test_the_final_checkpoint_is_saved_before_a_failing_final_evaluation(small_corpus, tmp_path, monkeypatch):
    cfg = tiny_cfg(small_corpus, tmp_path, **{"checkpoint.every": 0})

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    evaluate = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", broken)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        loop.train(cfg, quiet=True)
    assert ckpt_io.resolve_checkpoint(tmp_path).name == "step-0000008"
    trained = load_model(tmp_path).state_dict()
    monkeypatch.setattr(loop, "evaluate", evaluate)
    summary = loop.train(cfg, resume=True, quiet=True)  # evaluates the saved model, trains nothing more
    assert summary["step"] == 8 and summary["val_loss"] > 0 and summary["stopped_by"] == "max_steps"
    assert [r["step"] for r in records(tmp_path) if "val_loss" in r] == [8]
    assert all(torch.equal(p, trained[k]) for k, p in load_model(tmp_path).state_dict().items())


@pytest.mark.parametrize(
    ("budget", "stopped_by"),
    [({"train.max_steps": 3}, "max_steps"), ({"train.max_steps": 0, "train.max_tokens": 3 * 4 * 32}, "max_tokens")],
)
def test_stopped_by_names_the_limit_that_stopped_the_run(small_corpus, tmp_path, budget, stopped_by):
    summary = loop.train(tiny_cfg(small_corpus, tmp_path, **budget), quiet=True)
    assert summary["stopped_by"] == stopped_by and summary["step"] == 3
    assert json.loads((tmp_path / "summary.json").read_text())["stopped_by"] == stopped_by


def test_the_summary_never_describes_an_older_state_than_the_checkpoint(small_corpus, tmp_path, monkeypatch):
    cfg = tiny_cfg(small_corpus, tmp_path, **{"train.max_steps": 12, "checkpoint.every": 3})
    first = loop.train(cfg, quiet=True, stop_after=5)  # Ctrl-C during step 5
    assert first["stopped_by"] == "interrupt" and first["step"] == first["checkpoint_step"] == 5
    assert ckpt_io.resolve_checkpoint(tmp_path).name == "step-0000005"
    save = ckpt_io.save_checkpoint

    def save_then_die(run_dir, step, *args, **kwargs):  # the resumed run is killed after saving step 9
        path = save(run_dir, step, *args, **kwargs)
        if step == 9:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(ckpt_io, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg, resume=True, quiet=True)
    summary = tmp_path / "summary.json"
    assert not summary.exists() or json.loads(summary.read_text())["step"] == 9


def test_the_divergence_message_names_a_checkpoint_only_when_there_is_one(small_corpus, tmp_path, monkeypatch):
    build = loop.build_model

    def poisoned(cfg, vocab):  # the loss of step 3 onwards is NaN
        model = build(cfg, vocab)
        forward, calls = model.forward, []

        def nan_forward(*args, **kwargs):
            out = forward(*args, **kwargs)
            calls.append(1)
            if len(calls) >= 3:
                out.loss = out.loss * float("nan")
            return out

        model.forward = nan_forward
        return model

    monkeypatch.setattr(loop, "build_model", poisoned)
    for every, expected in ((0, "no checkpoint had been saved"), (2, f"(step 2) is kept in {tmp_path / 'b'}")):
        with pytest.raises(loop.TrainingDiverged) as caught:
            loop.train(tiny_cfg(small_corpus, tmp_path / "ab"[every // 2], **{"checkpoint.every": every}), quiet=True)
        assert expected in str(caught.value) and "step 3" in str(caught.value)


def test_resuming_a_finished_run_adds_nothing_unless_a_budget_grew(small_corpus, tmp_path, capsys):
    argv = cli_run(small_corpus, tmp_path, "--max-steps", "4")
    assert cli_main(argv) == 0
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert cli_main(argv + ["--resume"]) == 0
    assert "already finished" in capsys.readouterr().err
    assert snapshot(tmp_path) == before
    assert cli_main(["train", "--out", str(tmp_path), "--resume", "--max-steps", "6"]) == 0
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3, 4, 4, 5, 6, 6]  # a validation at 4, then at 6


def test_resume_drops_a_metrics_line_cut_short_by_a_kill(small_corpus, tmp_path):
    full, run = tmp_path / "full", tmp_path / "R"
    loop.train(tiny_cfg(small_corpus, full), quiet=True)
    loop.train(tiny_cfg(small_corpus, run), quiet=True, stop_after=5)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 4.1')  # the kill came mid-write
    loop.train(tiny_cfg(small_corpus, run), resume=True, quiet=True)
    assert losses(run) == losses(full)


def test_a_train_state_without_the_optimizer_is_one_line_and_exit_2(small_corpus, tmp_path, capsys):
    assert cli_main(cli_run(small_corpus, tmp_path, "--max-steps", "2")) == 0
    state_file = ckpt_io.resolve_checkpoint(tmp_path) / "train_state.json"
    state = json.loads(state_file.read_text())
    del state["optimizer"]
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    assert cli_main(cli_run(small_corpus, tmp_path, "--max-steps", "4", "--resume")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'optimizer'" in err and "train_state.json" in err
