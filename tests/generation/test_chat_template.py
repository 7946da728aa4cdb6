"""Chat templates are bounded: a template that loops, recurses, divides by zero or grows without end
fails with one line naming the template, within its time budget; malformed tokenizer_config.json
files are one clear error, in the library and in `nanoseek chat` (exit 2)."""

from __future__ import annotations

import io
import json
import time

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.cli import main
from nanoseek.data.tokenizer import CharTokenizer
from nanoseek.errors import NanoseekError
from nanoseek.generation.chat import load_chat_template, render_chat
from nanoseek.generation.template_sandbox import ChatTemplateError, TemplateWorker

pytest.importorskip("jinja2")

MESSAGES = [{"role": "user", "content": "Hi"}]
NESTED_LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


@pytest.fixture(scope="module")
def worker():
    w = TemplateWorker(seconds=1.0, max_chars=1000)
    yield w
    w.stop()


def render(worker, template: str) -> str:
    return worker.render(template, {"messages": MESSAGES, "add_generation_prompt": True}, "cfg.json")


@pytest.mark.parametrize(
    "template,why",
    [
        ("{{ 1/0 }}", "ZeroDivisionError: division by zero"),
        ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
        ("{% for m in messages %}", "syntax error on line 1"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recurses too deeply"),
        ("{{ 'x' * 3000000000 }}", "more memory"),
        ("{% for i in range(100) %}{{ 'x' * 100 }}{% endfor %}", "longer than 1000 characters"),
        ("{{ messages.__class__.__mro__ }}", "unsafe"),
    ],
)
def test_a_failing_template_is_one_error_naming_it(worker, template, why):
    with pytest.raises(ChatTemplateError, match="cfg.json") as info:
        render(worker, template)
    assert why in info.value.detail and "\n" not in str(info.value)
    assert render(worker, "{{ messages[0].content }}!") == "Hi!"  # the worker goes on (or a new one)


def test_a_template_that_never_ends_is_stopped_within_its_budget(worker):
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match="did not finish rendering within 1 s"):
        render(worker, NESTED_LOOP)
    assert time.monotonic() - start < 30  # far below the 10^10 steps it asked for
    assert worker.proc is None  # killed; the next render starts a fresh worker
    assert render(worker, "{{ add_generation_prompt }}") == "True"


def test_render_chat_uses_the_bounded_worker(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ 1/0 }}"}))
    with pytest.raises(ChatTemplateError, match="tokenizer_config.json failed: ZeroDivisionError"):
        render_chat(MESSAGES, load_chat_template(tmp_path))


@pytest.mark.parametrize(
    "content,message",
    [
        (json.dumps({"chat_template": 5}), "chat_template must be a string or a list of {name, template}, not int"),
        (json.dumps({"chat_template": [{"name": "default"}]}), "chat_template as a list must hold"),
        (json.dumps({"chat_template": [5]}), "chat_template as a list must hold"),
        (json.dumps(["chat_template"]), "must hold a JSON object, not a list"),
        (json.dumps({"chat_template": "x", "bos_token": 5}), "bos_token must be a string"),
        (json.dumps({"chat_template": "x", "eos_token": {"content": []}}), "eos_token must be a string"),
        (b'{"chat_template": "\xff\xfe"}', "is not UTF-8 text (byte 19)"),
        ("{not json", "is not valid JSON"),
        ("[" * 100000, "tokenizer_config.json"),
    ],
)
def test_a_malformed_tokenizer_config_is_one_error(tmp_path, content, message):
    path = tmp_path / "tokenizer_config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(NanoseekError, match="tokenizer_config.json") as info:
        load_chat_template(tmp_path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_named_templates_pick_the_default(tmp_path):
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ bos_token }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named, "bos_token": None}))
    info = load_chat_template(tmp_path)
    assert info["template"] == "D{{ bos_token }}" and info["bos_token"] == ""
    assert render_chat(MESSAGES, info) == "D"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "tiny"
    tok = CharTokenizer.train(["abcdefgh ij\n<|>:!"])
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("llama-tiny").replace(vocab_size=tok.vocab_size, max_position_embeddings=32)
    Transformer(cfg).save_pretrained(path)
    tok.save(path)
    return path


@pytest.mark.parametrize(
    "config,message",
    [
        ({"chat_template": "{{ 1/0 }}"}, "failed: ZeroDivisionError: division by zero"),
        ({"chat_template": 5}, "chat_template must be a string"),
        (["not", "an", "object"], "must hold a JSON object"),
        (b"\xff\xfe{}", "is not UTF-8 text (byte 0)"),
    ],
)
def test_chat_command_reports_a_broken_template_in_one_line(checkpoint, config, message, capsys, monkeypatch):
    raw = config if isinstance(config, bytes) else json.dumps(config).encode()
    (checkpoint / "tokenizer_config.json").write_bytes(raw)
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    try:
        assert main(["chat", str(checkpoint), "--max-new-tokens", "3"]) == 2
    finally:
        (checkpoint / "tokenizer_config.json").unlink()
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("nanoseek: error:") and "Traceback" not in "\n".join(err)


def test_a_chat_template_jinja_file_is_read_as_utf8_and_named_in_errors(tmp_path):
    jinja = tmp_path / "chat_template.jinja"
    jinja.write_bytes(b"\xff{{ 1 }}")
    with pytest.raises(NanoseekError, match="chat_template.jinja is not UTF-8 text"):
        load_chat_template(tmp_path)
    jinja.write_text("{{ 1/0 }}")
    with pytest.raises(ChatTemplateError, match="chat_template.jinja failed: ZeroDivisionError"):
        render_chat(MESSAGES, load_chat_template(tmp_path))
