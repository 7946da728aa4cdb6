"""The server of an encoder-decoder: completions translate the prompt; chat and embeddings are refused clearly."""

import pytest
import torch

from nanoseek.config import ModelConfig
from nanoseek.data.tokenizer import CharTokenizer
from nanoseek.generation.seq2seq import search, translate
from nanoseek.model import make_model
from nanoseek.serve.seq2seq import create_seq2seq_app

testclient = pytest.importorskip("fastapi.testclient")


@pytest.fixture(scope="module")
def served():
    tok = CharTokenizer("0123456789")
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("vaswani-tiny-ed", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                  tie_word_embeddings=False, initializer_range=0.3)  # fmt: skip
    model = make_model(cfg).eval()
    app = create_seq2seq_app(model, tok, "couplets", max_tokens_limit=20, beam=3)
    return testclient.TestClient(app), model, tok


def test_completions_translate_the_prompt(served):
    client, model, tok = served
    r = client.post("/v1/completions", json={"model": "couplets", "prompt": ["1234", "567"], "max_tokens": 6})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["text"] for c in body["choices"]] == translate(model, tok, ["1234", "567"], 3, max_new_tokens=6)
    assert body["object"] == "text_completion" and body["usage"]["prompt_tokens"] == 7
    assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"])


def test_n_best_come_from_the_beam(served):
    client, model, tok = served
    r = client.post("/v1/completions", json={"model": "couplets", "prompt": "1234", "n": 2, "best_of": 4,
                                             "max_tokens": 5, "temperature": 0.7})  # fmt: skip
    assert r.status_code == 200, r.text
    hyps = search(model, tok, [tok.encode("1234")], beam_size=4, max_new_tokens=5)[0]
    assert [c["text"] for c in r.json()["choices"]] == [tok.decode(h.tokens) for h in hyps[:2]]


@pytest.mark.parametrize(
    "path, body, status, needle",
    [
        ("/v1/chat/completions", {"model": "couplets", "messages": [{"role": "user", "content": "hi"}]}, 400,
         "encoder-decoder"),
        ("/v1/embeddings", {"model": "couplets", "input": "12"}, 400, "encoder-decoder"),
        ("/v1/completions", {"model": "couplets", "prompt": "12", "stream": True}, 400, "stream"),
        ("/v1/completions", {"model": "couplets", "prompt": "12", "logprobs": 2}, 400, "logprobs"),
        ("/v1/completions", {"model": "couplets", "prompt": "12", "response_format": {"type": "json_object"}}, 400,
         "response_format"),
        ("/v1/completions", {"model": "couplets", "prompt": "12", "n": 5, "best_of": 2}, 400, "n=5"),
        ("/v1/completions", {"model": "couplets", "prompt": "12", "max_tokens": 50}, 400, "max_tokens=50"),
        ("/v1/completions", {"model": "couplets", "prompt": ""}, 400, "empty"),
        ("/v1/completions", {"model": "other", "prompt": "12"}, 404, "does not exist"),
        ("/v1/completions", {"model": "couplets", "prompt": "1" * 80}, 400, "context"),
    ],
)  # fmt: skip
def test_what_does_not_fit_is_a_clear_4xx(served, path, body, status, needle):
    client, _, _ = served
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_health_and_models(served):
    client, _, _ = served
    assert client.get("/health").json()["architecture"] == "encoder_decoder"
    assert client.get("/v1/models").json()["data"][0]["id"] == "couplets"
    assert client.get("/").status_code == 400


def test_serve_builds_the_seq2seq_app_without_the_decoder_only_speedups(served):
    """`nanoseek serve` asks for the compiled step, the prefix cache and (on two cores) the engine
    process by default; an encoder-decoder's app has none of them, and says so."""
    from nanoseek.serve.server import build_app

    _, model, tok = served
    app, compiled, prefix, own_process = build_app(model, tok, "couplets", True, 512 << 20, True, max_tokens_limit=20)
    assert (compiled, prefix, own_process) == (False, 0, False)
    r = testclient.TestClient(app).post("/v1/completions", json={"model": "couplets", "prompt": "12", "max_tokens": 3})
    assert r.status_code == 200, r.text
