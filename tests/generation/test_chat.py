import json

import pytest

from nanoseek.errors import NanoseekError
from nanoseek.generation.chat import load_chat_template, render_chat

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def test_plain_transcript_without_a_template():
    assert render_chat(MESSAGES) == "System: Be brief.\nUser: Hi\nAssistant:"


def test_checkpoint_template_is_rendered(tmp_path):
    pytest.importorskip("jinja2")
    template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": template, "bos_token": {"content": "<s>"}, "eos_token": "</s>"})
    )
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


def count_chars(text: str) -> int:
    return len(text)


def test_trim_history_drops_the_oldest_exchange_and_keeps_the_system_message():
    from nanoseek.generation.chat import trim_history

    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u1" * 10},
        {"role": "assistant", "content": "a1" * 10},
        {"role": "user", "content": "u2"},
    ]
    full = render_chat(messages)
    prompt, room = trim_history(messages, render_chat, count_chars, max_new_tokens=10, context=len(full) + 9)
    assert [m["content"] for m in messages] == ["S", "u2"]  # one exchange dropped, roles still alternate
    assert prompt == render_chat(messages) and room == len(full) + 9 - len(prompt)


def test_trim_history_keeps_everything_that_fits_and_reports_no_room_for_a_long_message():
    from nanoseek.generation.chat import trim_history

    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "again"},
    ]
    prompt, room = trim_history(messages, render_chat, count_chars, max_new_tokens=4, context=200)
    assert len(messages) == 3 and room == 200 - len(prompt)
    long = [{"role": "user", "content": "x" * 50}]
    _, room = trim_history(long, render_chat, count_chars, max_new_tokens=4, context=20)
    assert long == [{"role": "user", "content": "x" * 50}] and room < 1  # the newest message stays


def test_chat_replies_record_the_history_and_refuse_a_message_longer_than_the_context():
    from types import SimpleNamespace

    import torch
    from torch import nn

    from nanoseek import ModelConfig
    from nanoseek.generation.chat import Chat, MessageTooLong

    class Echo(nn.Module):  # replies "ok", then the plain transcript's stop string "\nUser:"
        def __init__(self):
            super().__init__()
            self.config = ModelConfig.from_preset("gpt2-tiny", vocab_size=128, max_position_embeddings=64)
            self.turn = 0

        def make_cache(self, batch, max_len=None, dtype=None, device=None):
            self.turn = 0
            return [None] * self.config.num_hidden_layers

        def forward(self, input_ids, cache=None, start=0, last_only=False):
            reply = list(b"ok\nUser:")
            logits = torch.zeros(input_ids.shape[0], 1, 128)
            logits[:, :, reply[min(self.turn, len(reply) - 1)]] = 100.0
            self.turn += 1
            return SimpleNamespace(logits=logits)

    class Bytes:
        eos_id = None

        def encode(self, text):
            return list(text.encode())

        def decode_bytes(self, ids):
            return bytes(ids)

    chat = Chat(Echo(), Bytes(), system="Be brief.", max_new_tokens=16, temperature=0)
    assert "".join(chat.reply("Hi")) == "ok"
    assert chat.messages[-2:] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(MessageTooLong):
        list(chat.reply("x" * 100))
    assert chat.messages[-1] == {"role": "assistant", "content": "ok"}  # the long message was forgotten
