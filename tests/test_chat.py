import json

import pytest

from nanoseek.generation.chat import load_chat_template, render_chat
from nanoseek.errors import NanoseekError

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def test_plain_transcript_without_a_template():
    assert render_chat(MESSAGES) == "System: Be brief.\nUser: Hi\nAssistant:"


def test_checkpoint_template_is_rendered(tmp_path):
    pytest.importorskip("jinja2")
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
    info = load_chat_template(tmp_path)
    assert render_chat(MESSAGES, info) == "<s><|system|>Be brief.<|user|>Hi<|assistant|>"


def test_template_cannot_reach_python_internals(tmp_path):
    pytest.importorskip("jinja2")
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": evil}))
    with pytest.raises(NanoseekError, match="unsafe"):
        render_chat(MESSAGES, load_chat_template(tmp_path))


@pytest.mark.parametrize("bad", [[], [{"role": "robot", "content": "x"}], [{"role": "user"}], "hi"])
def test_bad_messages_name_the_problem(bad):
    with pytest.raises(NanoseekError, match="messages"):
        render_chat(bad)
