"""The HTTP server, driven by the official `openai` client and raw HTTP against a real process."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time

import pytest
import torch

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serving import CONTEXT, KEY, Server  # noqa: E402

from nanoseek.analysis.embed import embed  # noqa: E402
from nanoseek.generation.streaming import complete  # noqa: E402

# ---------------------------------------------------------------------------- the happy paths


def test_models_lists_the_checkpoint(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny-chat"]


def test_completion_equals_local_greedy_generation(client, local):
    model, tok = local
    expected, reason = complete(model, tok, "Hello", max_new_tokens=20, temperature=0)
    out = client.completions.create(model="tiny-chat", prompt="Hello", max_tokens=20, temperature=0)
    assert out.choices[0].text == expected
    assert out.choices[0].finish_reason == reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (5, 20)


def test_streamed_completion_equals_the_whole_answer(client, local):
    model, tok = local
    expected, _ = complete(model, tok, "日本 is", max_new_tokens=30, temperature=0)
    pieces, reasons = [], []
    for chunk in client.completions.create(
        model="tiny-chat", prompt="日本 is", max_tokens=30, temperature=0, stream=True
    ):
        pieces.append(chunk.choices[0].text)
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == expected
    assert reasons[-1] == "length" and set(reasons[:-1]) <= {None}


def test_sse_wire_format_ends_with_done_and_counts_usage(server):
    body = {
        "model": "tiny-chat",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] <= 6 and chunks[-1]["choices"] == []


def test_chat_completion(client, local):
    out = client.chat.completions.create(
        model="tiny-chat",
        max_tokens=12,
        temperature=0,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
    )
    choice = out.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    # the plain transcript: System/User lines then "Assistant:" (18 + 13 + 10 characters)
    assert out.usage.prompt_tokens == len("System: Be brief.\nUser: Hello\nAssistant:")


def test_stop_sequence_cuts_the_text(client):
    full = client.completions.create(model="tiny-chat", prompt="The", max_tokens=24, temperature=0).choices[0].text
    stop = full[6:8]
    cut = client.completions.create(model="tiny-chat", prompt="The", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_deterministic_and_n_gives_choices(client):
    ask = dict(model="tiny-chat", prompt="Once", max_tokens=16, temperature=1.0, top_p=0.95)
    a = client.completions.create(seed=42, **ask).choices[0].text
    b = client.completions.create(seed=42, **ask).choices[0].text
    c = client.completions.create(seed=43, **ask).choices[0].text
    assert a == b and a != c
    two = client.completions.create(seed=42, n=2, **ask)
    assert sorted(ch.index for ch in two.choices) == [0, 1]
    assert two.choices[0].text == a  # choice i uses seed + i
    assert two.usage.completion_tokens == 32


def test_embeddings_match_nanoseek_embed(client, local):
    model, tok = local
    out = client.embeddings.create(model="tiny-chat", input=["to be", "or not"])  # the client asks for base64
    vecs = torch.tensor([d.embedding for d in out.data])
    assert vecs.shape == (2, model.config.hidden_size)
    torch.testing.assert_close(vecs, embed(model, tok, ["to be", "or not"]), atol=1e-5, rtol=1e-5)
    assert out.usage.prompt_tokens == 11


def test_embeddings_float_format(server):
    r = httpx.post(
        server.url + "/v1/embeddings",
        json={"model": "tiny-chat", "input": "abc", "encoding_format": "float"},
        timeout=30,
    )
    vec = torch.tensor(r.json()["data"][0]["embedding"])
    assert abs(float(vec.norm()) - 1.0) < 1e-5


def test_chat_page_is_served(server):
    r = httpx.get(server.url + "/", timeout=10)
    assert r.status_code == 200 and "<script>" in r.text and "tiny-chat" in r.text
    assert "http" not in r.text.split("<script>")[1]  # no CDN: works offline


# ---------------------------------------------------------------------------- bad input: 4xx, never 5xx


def post(server, path, **kw):
    r = httpx.post(server.url + path, timeout=30, **kw)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["message"] and err["type"]
    return r.status_code, err


@pytest.mark.parametrize(
    "path,body,status,param",
    [
        ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
        ("/v1/chat/completions", {"model": "tiny-chat"}, 400, "messages"),
        ("/v1/chat/completions", {"model": "tiny-chat", "messages": []}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": "tiny-chat", "messages": [{"role": "robot", "content": "x"}]},
            400,
            "messages.0.role",
        ),
        ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "max_tokens": CONTEXT + 1}, 400, "max_tokens"),
        ("/v1/completions", {"model": "tiny-chat", "prompt": "x" * CONTEXT}, 400, "prompt"),
        ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "temperature": 5}, 400, "temperature"),
        ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "n": 0}, 400, "n"),
        ("/v1/completions", {"model": "tiny-chat", "prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"model": "tiny-chat", "prompt": [1, 2, 99999]}, 400, "prompt"),
        ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "stop": [""]}, 400, "stop"),
        ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "logprobs": 21}, 400, "logprobs"),
        ("/v1/completions", {"model": "tiny-chat", "prompt": []}, 400, "prompt"),
        ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "seed": 2**64}, 400, "seed"),
        ("/v1/embeddings", {"model": "tiny-chat", "input": []}, 400, "input"),
        ("/v1/embeddings", {"model": "tiny-chat", "input": "x" * CONTEXT}, 400, "input"),
        ("/v1/embeddings", {"model": "tiny-chat", "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ],
)
def test_bad_requests_get_openai_errors(server, path, body, status, param):
    got_status, err = post(server, path, json=body)
    assert got_status == status
    assert err["param"] == param


def test_invalid_json_and_oversized_bodies(server):
    status, err = post(
        server, "/v1/completions", content=b'{"model": "tiny-chat",', headers={"content-type": "application/json"}
    )
    assert status == 400 and err["code"] == "invalid_json"
    status, err = post(server, "/v1/completions", json={"model": "tiny-chat", "prompt": "x" * 30000})
    assert status == 413 and "20000" in err["message"]


def test_unknown_routes_and_methods(server):
    assert httpx.get(server.url + "/v1/nothing", timeout=10).status_code == 404
    r = httpx.get(server.url + "/v1/completions", timeout=10)
    assert r.status_code == 405 and r.json()["error"]["message"]


def test_too_much_work_is_refused_with_429(server):
    # the server runs 2 sequences and queues 2: a request for 5 choices cannot fit
    status, err = post(server, "/v1/completions", json={"model": "tiny-chat", "prompt": "x", "n": 5})
    assert status == 429 and err["code"] == "rate_limit_exceeded"
    assert server.health()["waiting"] == 0


def test_client_disconnect_cancels_generation(server):
    before = server.health()["tokens_generated"]
    body = {"model": "tiny-chat", "prompt": "a", "max_tokens": CONTEXT - 2, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)  # the first chunk arrived: generation is running
    deadline = time.time() + 10
    while time.time() < deadline and server.health()["running"]:
        time.sleep(0.05)
    health = server.health()
    assert health["running"] == 0 and health["waiting"] == 0
    # a streaming request that was not cancelled would have produced all of its tokens
    assert health["tokens_generated"] - before < CONTEXT - 2 or pytest.skip("generation outran the disconnect")


# ---------------------------------------------------------------------------- API key


@pytest.fixture(scope="module")
def keyed(checkpoint):
    s = Server(checkpoint, "--api-key", KEY)
    yield s
    s.stop()


def test_api_key_is_required_on_every_route_but_health(keyed):
    assert httpx.get(keyed.url + "/health", timeout=10).status_code == 200
    for path in ("/", "/v1/models"):
        r = httpx.get(keyed.url + path, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(keyed.url + "/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10)
    assert r.status_code == 401
    body = {"model": "tiny-chat", "prompt": "x"}
    assert httpx.post(keyed.url + "/v1/completions", json=body, timeout=10).status_code == 401
    good = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0)
    answer = good.completions.create(model="tiny-chat", prompt="x", max_tokens=2, temperature=0)  # greedy: no EOS
    assert answer.usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    basic = base64.b64encode(f"user:{KEY}".encode()).decode()
    page = httpx.get(keyed.url + "/", headers={"Authorization": f"Basic {basic}"}, timeout=10)
    assert page.status_code == 200  # a browser can log in to the chat page


@pytest.mark.parametrize(
    "args,message", [(["--max-batch", "0"], "--max-batch=0"), (["--prefix-cache-mb", "-1"], "--prefix-cache-mb=-1")]
)
def test_serve_refuses_bad_arguments(checkpoint, args, message):
    r = subprocess.run(
        [sys.executable, "-m", "nanoseek", "serve", str(checkpoint), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
