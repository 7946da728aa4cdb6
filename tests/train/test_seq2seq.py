"""Training on pair tasks: exact resume of an encoder-decoder, the copy task learned, the commands around it."""

import json
from pathlib import Path

import pytest
import torch

from nanoseek import load_model
from nanoseek.cli import main as cli_main
from nanoseek.config import build_train_config
from nanoseek.io import load_checkpoint
from nanoseek.train import loop
from nanoseek.train.evaluate_pairs import evaluate_pair_checkpoint

pytest.importorskip("sacrebleu")

TINY_MODEL = {"model.hidden_size": 32, "model.intermediate_size": 64, "model.num_hidden_layers": 1,
              "model.encoder_layers": 1}  # fmt: skip


def pair_cfg(out, preset="vaswani-tiny-ed", **overrides):
    base = {
        "data.task": "reverse",
        "data.seq_len": 10,
        "train.batch_size": 8,
        "train.max_steps": 8,
        "train.max_seconds": 0,
        "train.threads": 1,
        "eval.every": 4,
        "eval.batches": 2,
        "eval.batch_size": 8,
        "checkpoint.every": 4,
        "log.every": 1,
        "log.progress": False,
        "log.plot": False,
        "schedule.warmup_steps": 3,
        "out": str(out),
        **({} if preset != "vaswani-tiny-ed" else TINY_MODEL),
    }
    return build_train_config(preset=preset, overrides={**base, **overrides})


def losses(out) -> list:
    return [r["loss"] for r in map(json.loads, Path(out, "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_resume_is_exact_for_an_encoder_decoder(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    loop.train(pair_cfg(full), quiet=True)  # dropout 0.1 and label smoothing 0.1: the RNG must come back too
    assert loop.train(pair_cfg(part), quiet=True, stop_after=5)["step"] == 5
    loop.train(pair_cfg(part), resume=True, quiet=True)
    assert losses(part) == losses(full)
    for (name, p), q in zip(load_model(full).state_dict().items(), load_model(part).state_dict().values()):
        assert torch.equal(p, q), name


def test_the_copy_task_learns_in_a_few_seconds(tmp_path):
    cfg = pair_cfg(tmp_path, **{
        "data.task": "copy", "train.max_steps": 300, "train.batch_size": 32, "model.hidden_size": 64,
        "model.intermediate_size": 128, "model.hidden_dropout": 0.0, "train.label_smoothing": 0.0,
        "optim.lr": 5e-3, "schedule.name": "constant", "schedule.warmup_steps": 30, "eval.every": 0,
        "checkpoint.every": 0, "log.every": 50,
    })  # fmt: skip
    loop.train(cfg, quiet=True)
    model, tok, folder = load_checkpoint(tmp_path)
    scores, rows = evaluate_pair_checkpoint(model, tok, folder, beam_size=1)
    assert scores["exact_match"] > 0.5 and scores["chrf"] > 70, (scores, rows[:5])


def test_a_decoder_only_model_learns_the_answer_only(tmp_path, poems_file, capsys):
    out = tmp_path / "dec"
    argv = ["train", "--preset", "vaswani-tiny", "--data", str(poems_file), "--out", str(out), "--max-steps", "3",
            "--data.task=couplets", "--data.seq_len=16", "--train.batch_size=4", "--train.label_smoothing=0.1",
            "--log.progress=false", "--eval.batches=1", "--log.plot=false"]  # fmt: skip
    assert cli_main(argv) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # 3 steps of 4 pairs: each 5 characters + <eos> of targets; the source is not a target
    assert [r for r in records if "tokens" in r][-1]["tokens"] == 3 * 4 * 6
    capsys.readouterr()
    assert cli_main(["sample", str(out), "--source", "天地一二三", "--beam", "2"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    assert cli_main(["eval", str(out), "--max-sentences", "4", "--samples", "2", "--beam", "1", "--json"]) == 0
    captured = capsys.readouterr()
    scores = json.loads(captured.out)
    assert {"bleu", "chrf", "exact_length_rate", "exact_match", "loss", "perplexity", "tokens"} <= set(scores)
    assert scores["sentences"] == 4 and scores["task"] == "couplets"
    assert captured.err.count("reference:") == 2
    assert cli_main(["eval", str(out), "--max-sentences", "4", "--samples", "3", "--beam", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()  # on a terminal: the samples, then the scores
    assert sum("reference:" in line for line in lines) == 3 and any(line.startswith("chrF") for line in lines)


def test_the_commands_of_an_encoder_decoder_run(tmp_path, poems_file, capsys):
    out = tmp_path / "ed"
    argv = ["train", "--preset", "vaswani-tiny-ed", "--data", str(poems_file), "--out", str(out), "--max-steps", "4",
            "--data.task=couplets", "--train.batch_size=4", "--log.progress=false", "--eval.batches=1",
            "--log.plot=false", "--checkpoint.every=2", *(f"--{k}={v}" for k, v in TINY_MODEL.items())]  # fmt: skip
    assert cli_main(argv) == 0
    capsys.readouterr()
    assert cli_main(["sample", str(out), "--source", "天地一二三"]) == 0
    assert cli_main(["eval", str(out), "--max-sentences", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["sentences"] == 3
    assert cli_main(["average", str(out), "--last", "2"]) == 0
    assert cli_main(["eval", str(out / "average-last-2"), "--max-sentences", "3", "--beam", "1"]) == 0
    assert cli_main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["encoder_layers"] == 1
    assert cli_main(["info", str(out)]) == 0
    assert "encoder-decoder, 1 + 1 layers" in capsys.readouterr().out
    for argv, message in [
        (["chat", str(out)], "needs a decoder-only one"),
        (["sample", str(out), "--prompt", "天"], "give the text to translate with --source"),
        (["convert", str(out), str(tmp_path / "hf"), "--to", "hf"], "MarianMT"),
        (["sample", str(out), "--source", "天", "--beam", "0"], "beam size 0"),
        (["train", "--out", str(out), "--resume", "--data.task=copy"], "data.task"),
        (["bench", "decode", "--preset", "vaswani-tiny-ed"], "the benches time decoder-only models"),
    ]:
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_language_model_has_no_source(tmp_path, small_corpus, capsys):
    cfg = build_train_config(preset="gpt2-tiny", overrides={
        "data.path": [small_corpus], "data.seq_len": 16, "train.batch_size": 2, "train.max_steps": 1,
        "log.progress": False, "log.plot": False, "eval.batches": 1, "out": str(tmp_path),
    })  # fmt: skip
    loop.train(cfg, quiet=True)
    capsys.readouterr()
    assert cli_main(["sample", str(tmp_path), "--source", "a"]) == 2
    assert "use --prompt" in capsys.readouterr().err
