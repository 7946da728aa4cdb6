"""The one evaluation loop (training's validation and `nanoseek eval`), and loading a checkpoint with its
tokenizer and folder."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanoseek import ModelConfig, Transformer
from nanoseek.data.shards import iter_eval_batches
from nanoseek.data.tokenizer import CharTokenizer
from nanoseek.errors import NanoseekError
from nanoseek.io import convert, load_checkpoint, load_model
from nanoseek.train.evaluate import evaluate, evaluate_checkpoint, fixed_batches

TEXT = "To be, or not to be, that is the question: 秦川雄帝宅 🙂\n" * 6


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer.train([TEXT])


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    config = ModelConfig.from_preset("gpt2-tiny").replace(vocab_size=tok.vocab_size)
    return Transformer(config).eval()


@pytest.fixture
def ckpt(model, tok, tmp_path):
    path = tmp_path / "ckpt"
    model.save_pretrained(path)
    tok.save(path)
    return path


def test_loss_is_token_weighted_cross_entropy_and_bits_per_byte_counts_target_bytes(model, tok):
    tokens = np.asarray(tok.encode(TEXT), dtype=np.int64)
    batches = list(iter_eval_batches(tokens, batch_size=3, block_size=40))  # the last batch is shorter
    assert len({y.numel() for _, y in batches}) > 1
    result = evaluate(model, batches, tok.token_byte_lengths())
    with torch.no_grad():
        nats = sum(
            F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten(), reduction="sum").item() for x, y in batches
        )
    assert result.tokens == len(tokens) - 1 and result.bytes == len(TEXT.encode()) - 1  # the first char is 1 byte
    assert result.loss == pytest.approx(nats / result.tokens, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss))
    assert result.bits_per_byte == pytest.approx(nats / math.log(2) / result.bytes, rel=1e-5)


def test_validation_windows_are_the_same_every_time_and_the_mode_is_kept(model, tok):
    tokens = np.asarray(tok.encode(TEXT), dtype=np.int64)
    model.train()
    first = evaluate(model, fixed_batches(tokens, 2, 16, batches=3, seed=5))
    again = evaluate(model, fixed_batches(tokens, 2, 16, batches=3, seed=5))
    assert model.training and first == again and first.tokens == 3 * 2 * 16
    model.eval()


def test_eval_of_a_file_matches_the_loop(model, tok, ckpt, tmp_path):
    data = tmp_path / "held_out.txt"
    data.write_text(TEXT[:200], encoding="utf-8")
    loaded = load_checkpoint(ckpt)
    report = evaluate_checkpoint(loaded.model, loaded.tokenizer, loaded.folder, data, seq_len=32, batch_size=4)
    direct = evaluate(
        model, iter_eval_batches(np.asarray(tok.encode(data.read_bytes())), 4, 32), tok.token_byte_lengths()
    )
    assert report["loss"] == pytest.approx(direct.loss, rel=1e-6) and report["tokens"] == direct.tokens
    assert report["bits_per_byte"] == pytest.approx(direct.bits_per_byte, rel=1e-6)


def test_eval_without_a_training_record_asks_for_data(ckpt):
    model, tok, folder = load_checkpoint(ckpt)
    with pytest.raises(NanoseekError, match="--data"):
        evaluate_checkpoint(model, tok, folder)


# ----------------------------------------------------------------------------- loading


def test_load_checkpoint_returns_model_tokenizer_and_folder(ckpt, tok):
    model, loaded_tok, folder = load_checkpoint(ckpt)
    assert folder == ckpt and not model.training
    assert loaded_tok.encode(TEXT) == tok.encode(TEXT)
    assert load_checkpoint(ckpt, tokenizer=False).tokenizer is None
    assert not hasattr(load_model(ckpt), "checkpoint_dir")  # the folder comes back from the loader


def test_load_checkpoint_without_a_tokenizer_names_the_folder(model, tmp_path):
    model.save_pretrained(tmp_path / "bare")
    with pytest.raises(NanoseekError, match="bare has no tokenizer.json"):
        load_checkpoint(tmp_path / "bare")
    assert load_model(tmp_path / "bare") is not None


def test_saving_copies_the_tokenizer_only_when_given_its_folder(ckpt, tmp_path):
    model = load_model(ckpt)
    model.save_pretrained(tmp_path / "without")
    model.save_pretrained(tmp_path / "with", tokenizer_dir=ckpt)
    assert not (tmp_path / "without" / "tokenizer.json").exists()
    assert (tmp_path / "with" / "tokenizer.json").read_text() == (ckpt / "tokenizer.json").read_text()


def test_convert_carries_the_tokenizer_and_refuses_a_full_destination(ckpt, tmp_path):
    out = convert(ckpt, tmp_path / "copy", "nanoseek")
    assert json.loads((out / "config.json").read_text())["model_type"] == "nanoseek"
    assert (out / "tokenizer.json").is_file()
    with pytest.raises(NanoseekError, match="not empty"):
        convert(ckpt, out, "nanoseek")
