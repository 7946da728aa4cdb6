"""What a new user meets in the first hour: one spelling of the shared flags, notes for old preset
names, `nanoseek config`, people-first output with `--json` for programs, chat's commands."""

from __future__ import annotations

import io
import json

import pytest
import tomllib
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.cli import main
from nanoseek.cli.common import human_count
from nanoseek.config import build_train_config
from nanoseek.config.docs import describe
from nanoseek.config.presets import ALIASES, PRESETS
from nanoseek.data.tokenizer import CharTokenizer
from nanoseek.errors import NanoseekWarning
from nanoseek.io import save_model


def test_an_unknown_command_gets_the_closest_one(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'train'" in err and err.count("\n") == 1


def test_old_preset_names_load_with_a_one_line_note(capsys):
    for old, new in ALIASES.items():
        assert old not in PRESETS and new in PRESETS
        with pytest.warns(NanoseekWarning, match=f"now called '{new}'"):
            assert ModelConfig.from_preset(old) == ModelConfig.from_preset(new)
    with pytest.warns(NanoseekWarning):
        assert build_train_config(preset="gpt2-small").preset == "gpt2-mini"
    assert main(["info", "--preset", "gpt2-small", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["preset"] == "gpt2-mini"
    assert err.count("\n") == 1 and "now called 'gpt2-mini'" in err and "124M" in err


def test_size_words_mean_the_same_size_in_every_family():
    """-tiny < -mini < -small across families: every -tiny is smaller than every -mini, and so on."""

    def total(name):
        with torch.device("meta"):
            return sum(p.numel() for p in Transformer(ModelConfig.from_preset(name)).parameters())

    sizes = {word: [total(n) for n in PRESETS if n.endswith(f"-{word}")] for word in ("tiny", "mini", "small")}
    assert max(sizes["tiny"]) < min(sizes["mini"]) and max(sizes["mini"]) < min(sizes["small"])


def test_info_on_a_terminal_speaks_in_billions_and_active_means_per_token(capsys):
    assert main(["info", "--preset", "deepseek-v3"]) == 0
    out = capsys.readouterr().out
    assert "671.0B total, 37.6B active per token (36.6B without the embedding table)" in out
    assert main(["info", "--preset", "llama-tiny", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params_active"] == info["params_total"] > info["params_active_non_embedding"]  # dense


def test_human_count():
    assert [human_count(n) for n in (671026404352, 999_999, 842_240, 12)] == ["671.0B", "1.00M", "842.2K", "12"]


def test_every_config_field_has_a_meaning():
    for section, what, fields in describe(build_train_config(preset="deepseek-v4-tiny")):
        assert what
        for name, _, meaning in fields:
            assert meaning, f"{section}.{name} has no comment in its dataclass"


def test_config_prints_every_field_as_toml_that_train_reads_back(capsys, tmp_path):
    assert main(["config", "--preset", "deepseek-v4-tiny", "--optim.lr=3e-4"]) == 0
    text = capsys.readouterr().out
    assert "hidden_size = 64" in text and "# width d of the residual stream" in text
    path = tmp_path / "run.toml"
    path.write_text(text)
    tomllib.loads(text)
    assert build_train_config(path) == build_train_config(preset="deepseek-v4-tiny", overrides={"optim.lr": 3e-4})
    assert main(["config", "--preset", "gpt2-tiny", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["preset"] == "gpt2-tiny" and data["meanings"]["train.max_seconds"]


def test_a_vocab_size_that_would_be_ignored_is_an_error(capsys, tmp_path):
    assert main(["train", "--preset", "gpt2-tiny", "--data.vocab_size=4096", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "data.vocab_size=4096" in err and "char" in err and err.count("\n") == 1
    assert build_train_config(preset="gpt2-tiny", overrides={"data.tokenizer": "bpe", "data.vocab_size": 4096})


def test_train_flags_are_the_overrides_they_name(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("nanoseek.cli.train.train", lambda cfg, **kw: seen.setdefault("cfg", cfg) and {})
    argv = ["train", "--preset", "gpt2-tiny", "--out", str(tmp_path), "--max-seconds", "45", "--max-tokens", "9"]
    argv += ["--threads", "1", "--device", "cpu", "--dtype", "bfloat16", "--compile", "--json"]
    assert main(argv) == 0
    loop = seen["cfg"].train
    assert (loop.max_seconds, loop.max_tokens, loop.threads, loop.device, loop.dtype, loop.compile) == (
        45.0, 9, 1, "cpu", "bfloat16", True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    tok = CharTokenizer.train(["User: hello there\nAssistant: good day to you\n"])
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("gpt2-tiny", vocab_size=tok.vocab_size, max_position_embeddings=64))
    save_model(model, folder)
    tok.save(folder / "tokenizer.json")
    return folder


def test_chat_marks_roles_and_runs_its_slash_commands(tiny_checkpoint, monkeypatch, capsys):
    lines = "hello\n/help\n/reset\n/rest\nhello again\n/exit\nnever sent\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    sent = []
    monkeypatch.setattr("nanoseek.cli.generate.Chat.reply", lambda self, text: sent.append(text) or iter(["hi"]))
    argv = ["chat", str(tiny_checkpoint), "--threads", "1", "--device", "cpu", "--temperature", "0"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert sent == ["hello", "hello again"]  # commands never reach the model; /exit ends the chat
    assert out.count("model> hi") == 2
    assert "/reset" in err and "forgotten" in err and "did you mean '/reset'" in err


def test_chat_reset_forgets_all_but_the_system_message(tiny_checkpoint):
    from nanoseek.generation.chat import Chat
    from nanoseek.io import load_checkpoint

    model, tok, folder = load_checkpoint(tiny_checkpoint)
    chat = Chat(model, tok, system="Be kind.", max_new_tokens=80, temperature=0)
    reply = "".join(chat.reply("hello"))  # 80 new tokens run past the 64-token context: the reply slides
    assert len(chat.messages) == 3 and len(tok.encode(reply)) > 64 - len("System: Be kind.\nUser: hello\nAssistant:")
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "Be kind."}]


def test_eval_and_tokenizer_speak_to_people_and_to_programs(tiny_checkpoint, tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello there, good day to you\n" * 20)
    assert main(["eval", str(tiny_checkpoint), "--data", str(corpus), "--seq-len", "16", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("loss") and "bits per byte" in out
    assert main(["eval", str(tiny_checkpoint), "--data", str(corpus), "--seq-len", "16", "--json"]) == 0
    assert "bits_per_byte" in json.loads(capsys.readouterr().out)
    out_file = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--kind", "char", "--out", str(out_file), str(corpus)]) == 0
    assert f"--data.tokenizer={out_file}" in capsys.readouterr().out


def test_a_finished_run_reads_as_a_few_aligned_lines():
    from nanoseek.cli.train import summary_lines

    summary = {"step": 2000, "tokens": 4096000, "elapsed_s": 139.6, "stopped_by": "max_seconds",
               "checkpoint": "runs/default/checkpoints/step-0002000", "val_loss": 1.4962,
               "val_perplexity": 4.46, "val_bits_per_byte": 2.159}  # fmt: skip
    lines = summary_lines(summary, "runs/default").splitlines()
    assert lines[0] == "stopped     after 2,000 steps, 4,096,000 tokens, 140 s (max_seconds)"
    assert lines[1].startswith("validation  loss 1.4962, perplexity 4.46")
    assert all(line[10:12] == "  " and line[12] != " " for line in lines)  # the values in one column
