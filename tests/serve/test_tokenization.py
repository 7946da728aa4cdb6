"""/tokenize, /detokenize and /tokenizer_info, in vLLM's shapes, agree with the server's own encoding."""

from __future__ import annotations

import pytest

httpx = pytest.importorskip("httpx")


def post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=30)


def test_tokenize_gives_the_ids_completions_use(server, local):
    _, tok = local
    text = "Hello, 日本! <|eos|>"  # a special token's name inside a text stays text
    out = post(server, "/tokenize", {"model": "tiny-chat", "prompt": text, "return_token_strs": True}).json()
    assert out["tokens"] == tok.encode(text) and out["count"] == len(out["tokens"])
    assert out["max_model_len"] == 96 and "".join(out["token_strs"]) == text
    usage = post(server, "/v1/completions", {"model": "tiny-chat", "prompt": text, "max_tokens": 1}).json()["usage"]
    assert usage["prompt_tokens"] == out["count"]


def test_detokenize_inverts_tokenize(server, local):
    _, tok = local
    ids = tok.encode("ROMEO: ü")
    assert post(server, "/detokenize", {"tokens": ids}).json() == {"prompt": "ROMEO: ü"}
    r = post(server, "/detokenize", {"tokens": [1, 10**6]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


def test_tokenizer_info_names_the_special_tokens_that_tokenize_finds(server, local):
    _, tok = local
    info = httpx.get(server.url + "/tokenizer_info", timeout=30).json()
    assert info["tokenizer_class"] == "nanoseek.CharTokenizer" and info["model_max_length"] == 96
    for name, token_id in [("eos_token", tok.eos_id), ("bos_token", tok.bos_id), ("pad_token", tok.pad_id)]:
        assert post(server, "/tokenize", {"prompt": info[name]}).json()["tokens"] == [token_id]


def test_tokenize_chat_messages_renders_the_transcript(server, local):
    _, tok = local
    body = {"messages": [{"role": "user", "content": "Hi"}]}
    assert post(server, "/tokenize", body).json()["tokens"] == tok.encode("User: Hi\nAssistant:")
    r = post(server, "/tokenize", {**body, "prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = post(server, "/tokenize", {"model": "gpt-4", "prompt": "x"})
    assert r.status_code == 404
