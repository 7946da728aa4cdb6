"""`nanoseek average`: the averaged checkpoint holds the mean of the last K checkpoints' tensors."""

import json

import pytest
import torch

from nanoseek.cli import main as cli_main
from nanoseek.config import ModelConfig
from nanoseek.errors import NanoseekError
from nanoseek.io import load_checkpoint
from nanoseek.io.average import average_checkpoints
from nanoseek.io.checkpoint import MODEL_FILE, read_safetensors, save_checkpoint
from nanoseek.model import make_model


def run_with_checkpoints(run, steps, preset="vaswani-tiny-ed", **changes):
    config = ModelConfig.from_preset(
        preset, **{"vocab_size": 40, "hidden_size": 16, "intermediate_size": 32, **changes}
    )
    for step in steps:
        torch.manual_seed(step)
        save_checkpoint(run, step, make_model(config), train_state={"step": step, "config": {"data": {}}},
                        tokenizer_json="{}", keep_last=10)  # fmt: skip


def test_the_average_is_the_mean_of_the_last_k(tmp_path):
    run_with_checkpoints(tmp_path, [10, 20, 30, 40])
    out = average_checkpoints(tmp_path, 3)
    assert out == tmp_path / "average-last-3"
    states = [read_safetensors(tmp_path / "checkpoints" / f"step-{s:07d}" / MODEL_FILE) for s in (20, 30, 40)]
    averaged = read_safetensors(out / MODEL_FILE)
    assert set(averaged) == set(states[0])
    for name, tensor in averaged.items():
        torch.testing.assert_close(tensor, torch.stack([s[name] for s in states]).mean(0))
    record = json.loads((out / "train_state.json").read_text())
    assert record["averaged"] == ["step-0000020", "step-0000030", "step-0000040"] and record["step"] == 40
    assert load_checkpoint(out, tokenizer=False).model.config.architecture == "encoder_decoder"  # loads as usual


def test_averaging_needs_k_checkpoints_of_one_model(tmp_path):
    run_with_checkpoints(tmp_path, [1, 2])
    with pytest.raises(NanoseekError, match="fewer than --last=3.*keep_last=3"):
        average_checkpoints(tmp_path, 3)
    run_with_checkpoints(tmp_path, [3], hidden_size=32)
    with pytest.raises(NanoseekError, match="different models"):
        average_checkpoints(tmp_path, 2)
    with pytest.raises(NanoseekError, match="not a run folder"):
        average_checkpoints(tmp_path / "checkpoints" / "step-0000001", 1)


def test_the_average_command(tmp_path, capsys):
    run_with_checkpoints(tmp_path, [1, 2], preset="vaswani-tiny")
    assert cli_main(["average", str(tmp_path), "--last", "2", "--out", str(tmp_path / "avg"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(tmp_path / "avg")
    assert (tmp_path / "avg" / MODEL_FILE).is_file()
    assert cli_main(["average", str(tmp_path), "--last", "0"]) == 2
    assert "--last=0" in capsys.readouterr().err
