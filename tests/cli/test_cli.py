"""The command line as a user types it: overrides whatever their content, resume without repeating
the run's arguments, presets listed, misspellings answered with the closest name."""

from __future__ import annotations

import json

import pytest

from nanoseek.cli import COMMANDS, main, split_argv
from nanoseek.config import build_resume_config


def test_an_override_holding_a_space_is_an_override_not_the_config_path():
    argv = ["train", "--preset", "llama-tiny", '--model.sparse_layers=["sliding", "dense"]', "--max-steps", "1"]
    rest, overrides = split_argv(argv)
    assert overrides == ['--model.sparse_layers=["sliding", "dense"]']
    assert rest == ["train", "--preset", "llama-tiny", "--max-steps", "1"]


def tiny_run(small_corpus, out, *extra) -> list[str]:
    return [
        "train", "--preset", "gpt2-tiny", "--data", small_corpus, "--out", str(out), "--data.seq_len=32",
        "--train.batch_size=4", "--train.threads=1", "--eval.every=0", "--eval.batches=1", "--eval.batch_size=4",
        "--log.every=1", "--log.progress=false", "--log.plot=false", "--model.hidden_size=32", *extra,
    ]  # fmt: skip


def steps(out) -> list[int]:
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_resume_needs_only_the_run_folder(small_corpus, tmp_path, capsys):
    assert main(tiny_run(small_corpus, tmp_path, "--max-steps", "3")) == 0
    assert main(["train", "--out", str(tmp_path), "--resume", "--max-steps", "5"]) == 0  # budgets may change
    assert steps(tmp_path) == [1, 2, 3, 4, 5]
    assert json.loads((tmp_path / "train_config.json").read_text())["model"]["hidden_size"] == 32
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path), "--resume", "--model.hidden_size=48"]) == 2
    err = capsys.readouterr().err
    assert "model.hidden_size" in err and "32" in err and err.count("\n") == 1


def test_resume_config_keeps_the_model_and_takes_new_budgets(small_corpus, tmp_path):
    assert main(tiny_run(small_corpus, tmp_path, "--max-steps", "1")) == 0
    cfg = build_resume_config(tmp_path, {"train.max_seconds": 30, "optim.lr": 1e-4})
    assert cfg.model.hidden_size == 32 and cfg.train.max_seconds == 30 and cfg.optim.lr == 1e-4
    assert cfg.preset == "gpt2-tiny" and cfg.out == str(tmp_path)


def test_presets_lists_every_preset_with_its_size(capsys):
    assert main(["presets", "--json"]) == 0
    rows = {r["preset"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows["deepseek-v3"]["params_total"] > 6e11 and rows["deepseek-v3"]["params_active"] < 4e10
    assert rows["llama-tiny"]["ffn"] == "swiglu"
    assert main(["presets"]) == 0
    table = capsys.readouterr().out
    assert "deepseek-v3 " in table and "671.0B" in table and "37.6B" in table  # active: per token
    assert "gpt2-small = gpt2-mini" in table  # old names listed with what they are now


@pytest.mark.parametrize(
    "argv, hint",
    [
        (["info", "--preset", "gpt2-mni"], "did you mean 'gpt2-mini'"),
        (["train", "--preset", "gpt2-tiny", "--model.hiden_size=3"], "did you mean 'hidden_size'"),
        (["train", "--preset", "gpt2-tiny", "--optm.lr=3"], "did you mean 'optim'"),
    ],
)
def test_a_misspelt_name_gets_the_closest_one(argv, hint, capsys, tmp_path):
    assert main(argv + (["--out", str(tmp_path)] if argv[0] == "train" else [])) == 2
    err = capsys.readouterr().err
    assert hint in err and err.count("\n") == 1


def test_every_command_help_shows_its_defaults(capsys):
    for name in COMMANDS:
        if name == "bench":  # each benchmark has its own --help
            continue
        with pytest.raises(SystemExit):
            main([name, "--help"])
        assert "usage: nanoseek" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "(default: 0.8)" in capsys.readouterr().out
