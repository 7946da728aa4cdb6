"""A corpus of hostile HTTP requests against a real `nanoseek serve` on 127.0.0.1.

Each request (malformed HTTP, oversized, mistyped or out-of-range JSON, wrong routes and methods,
bad credentials) must get a 4xx in OpenAI's JSON error shape {"error": {message, type, param, code}},
leave the server healthy (/health answers), and leave another client's stream, running all along,
with exactly the text it gets alone. The server's API key is non-ASCII, sent as its UTF-8 bytes.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
from dataclasses import dataclass

import pytest

httpx = pytest.importorskip("httpx")

from serving import CONTEXT, Server  # noqa: E402

from nanoseek.serve.protocol import MAX_STOPS  # noqa: E402

KEY = "clé-日本-ключ"
AUTH = b"Authorization: Bearer " + KEY.encode()
MODEL = "tiny-chat"


@dataclass(frozen=True)
class Case:
    name: str
    raw: bytes  # the request, byte for byte
    status: int
    code: str | None = None  # the error's code, where it is a fixed one


def request(method: str, path: str, body=None, *headers: bytes, auth: bool = True, ctype: str | None = "json"):
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close"]
    lines += [AUTH] if auth else []
    if body is not None:
        body = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
        lines += [b"Content-Type: application/json"] if ctype == "json" else [ctype.encode()] if ctype else []
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join([*lines, *headers]) + b"\r\n\r\n" + (body or b"")


def completion(**fields) -> bytes:
    return request("POST", "/v1/completions", {"model": MODEL, "prompt": "x", **fields})


def completion_with(field: str, literal: str) -> bytes:
    """A completion request whose `field` is a JSON-ish literal json.dumps cannot write (NaN, 10^4999)."""
    return request("POST", "/v1/completions", f'{{"model": "{MODEL}", "prompt": "x", "{field}": {literal}}}')


def chat(**fields) -> bytes:
    return request(
        "POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], **fields}
    )


def embeddings(**fields) -> bytes:
    return request("POST", "/v1/embeddings", {"model": MODEL, "input": "x", **fields})


def raw_http(*lines: bytes, body: bytes = b"") -> bytes:
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chunked(*chunks: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


POST = b"POST /v1/completions HTTP/1.1"
HOST = b"Host: 127.0.0.1"
BAD = "invalid_http_request"
JSON_TYPE = b"Content-Type: application/json"
USER = [{"role": "user", "content": "x"}]

PROTOCOL = [
    Case("nul-in-path", raw_http(b"GET /v1/mod\x00els HTTP/1.1", HOST), 400, BAD),
    Case("space-in-path", raw_http(b"GET /v1/a b HTTP/1.1", HOST), 400, BAD),
    Case("content-length-abc", raw_http(POST, HOST, b"Content-Length: abc"), 400, BAD),
    Case("content-length-negative", raw_http(POST, HOST, b"Content-Length: -1"), 400, BAD),
    Case("content-length-float", raw_http(POST, HOST, b"Content-Length: 1e3"), 400, BAD),
    Case("content-length-23-digits", raw_http(POST, HOST, b"Content-Length: 99999999999999999999999"), 400, BAD),
    Case(
        "content-length-twice", raw_http(POST, HOST, b"Content-Length: 2", b"Content-Length: 3", body=b"{}"), 400, BAD
    ),
    Case("transfer-encoding-gzip", raw_http(POST, HOST, b"Transfer-Encoding: gzip"), 400, BAD),
    Case("bad-chunk-size", raw_http(POST, HOST, AUTH, b"Transfer-Encoding: chunked", body=b"zz\r\n"), 400, BAD),
    Case("header-200KB", raw_http(b"GET /health HTTP/1.1", HOST, b"X-Big: " + b"a" * 200_000), 431, BAD),
    Case("path-200KB", raw_http(b"GET /" + b"a" * 200_000 + b" HTTP/1.1", HOST), 431, BAD),
    Case("header-without-colon", raw_http(b"GET /health HTTP/1.1", HOST, b"NoColon"), 400, BAD),
    Case("header-name-with-space", raw_http(b"GET /health HTTP/1.1", HOST, b"Bad Name: y"), 400, BAD),
    Case("space-before-colon", raw_http(b"GET /health HTTP/1.1", b"Host : x"), 400, BAD),
    Case("nul-in-header-value", raw_http(b"GET /health HTTP/1.1", HOST, b"X: a\x00b"), 400, BAD),
    Case("no-host", raw_http(b"GET /health HTTP/1.1", b"Connection: close"), 400, BAD),
    Case("two-hosts", raw_http(b"GET /health HTTP/1.1", b"Host: a", b"Host: b"), 400, BAD),
    Case("http-0.9", b"GET /\r\n\r\n", 400, BAD),
    Case("bad-protocol-name", raw_http(b"GET /health HTTX/1.1", HOST), 400, BAD),
    Case("blank-lines-first", b"\r\n\r\n" + raw_http(b"GET /health HTTP/1.1", HOST), 400, BAD),
    Case("tls-client-hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, 400, BAD),
    Case("binary-garbage", bytes(range(256)) * 4, 400, BAD),
]

AUTHORIZATION = [
    Case("no-key", request("GET", "/v1/models", auth=False), 401, "invalid_api_key"),
    Case("wrong-key", request("GET", "/v1/models", None, b"Authorization: Bearer sk-wrong", auth=False), 401),
    Case(
        "key-as-latin-1-mojibake",
        request(
            "GET", "/v1/models", None, b"Authorization: Bearer " + KEY.encode().decode("latin-1").encode(), auth=False
        ),
        401,
    ),
    Case("key-prefix", request("GET", "/v1/models", None, AUTH[:-3], auth=False), 401),
    Case("key-plus-one", request("GET", "/v1/models", None, AUTH + b"x", auth=False), 401),
    Case("bearer-without-key", request("GET", "/v1/models", None, b"Authorization: Bearer", auth=False), 401),
    Case(
        "unknown-scheme", request("GET", "/v1/models", None, b"Authorization: Token " + KEY.encode(), auth=False), 401
    ),
    Case(
        "basic-wrong-password",
        request("GET", "/", None, b"Authorization: Basic " + base64.b64encode(b"u:nope"), auth=False),
        401,
    ),
    Case("basic-not-base64", request("GET", "/", None, b"Authorization: Basic %%%", auth=False), 401),
    Case(
        "authorization-10KB",
        request("GET", "/v1/models", None, b"Authorization: Bearer " + b"k" * 10_000, auth=False),
        401,
    ),
    Case(
        "no-key-for-completions", request("POST", "/v1/completions", {"model": MODEL, "prompt": "x"}, auth=False), 401
    ),
]

ROUTES = [
    Case("unknown-route", request("GET", "/v1/nothing"), 404, "not_found"),
    Case("percent-encoded-nul", request("GET", "/v1/%00"), 404, "not_found"),
    Case("percent-encoded-non-utf8", request("GET", "/%ff%fe"), 404, "not_found"),
    Case("path-traversal", request("GET", "/../../etc/passwd"), 404, "not_found"),
    Case("long-path-10KB", request("GET", "/" + "a" * 10_000), 404, "not_found"),
    Case("unknown-model-card", request("GET", "/v1/models/gpt-4"), 404, "model_not_found"),
    Case("get-completions", request("GET", "/v1/completions"), 405, "method_not_allowed"),
    Case("delete-models", request("DELETE", "/v1/models"), 405, "method_not_allowed"),
    Case("put-health", request("PUT", "/health", b"{}"), 405, "method_not_allowed"),
    Case("post-models", request("POST", "/v1/models", {}), 405, "method_not_allowed"),
    Case("options-completions", request("OPTIONS", "/v1/completions"), 405, "method_not_allowed"),
    Case("lowercase-method", request("get", "/health"), 405, "method_not_allowed"),
    Case("made-up-method", request("BREW", "/v1/models"), 405, "method_not_allowed"),
]

BODIES = [
    Case("invalid-json", request("POST", "/v1/completions", b'{"model": "tiny-chat",'), 400, "invalid_json"),
    Case("empty-json-body", request("POST", "/v1/completions", b""), 400),
    Case("json-array", request("POST", "/v1/completions", []), 400),
    Case("json-string", request("POST", "/v1/completions", "x"), 400),
    Case("json-null", request("POST", "/v1/completions", b"null"), 400),
    Case("not-utf8", request("POST", "/v1/completions", b'{"model": "\xff\xfe"}'), 400, "invalid_json"),
    Case("nested-19000-deep", request("POST", "/v1/completions", b"[" * 19_000), 400, "invalid_json"),
    Case("integer-of-5000-digits", completion_with("seed", "9" * 5000), 400),
    Case(
        "text-plain-body",
        request("POST", "/v1/completions", {"model": MODEL, "prompt": "x"}, ctype="Content-Type: text/plain"),
        400,
    ),
    Case(
        "body-over-limit",
        request("POST", "/v1/completions", {"model": MODEL, "prompt": "x" * 30_000}),
        413,
        "request_too_large",
    ),
    Case("content-length-over-limit", raw_http(POST, HOST, AUTH, JSON_TYPE, b"Content-Length: 999999999"), 413),
    Case(
        "chunked-body-over-limit",
        raw_http(POST, HOST, AUTH, JSON_TYPE, b"Transfer-Encoding: chunked", body=chunked(*[b" " * 4096] * 6)),
        413,
        "request_too_large",
    ),
    Case(
        "chunked-invalid-json",
        raw_http(POST, HOST, AUTH, JSON_TYPE, b"Transfer-Encoding: chunked", body=chunked(b"{x")),
        400,
    ),
    Case("nan-literal", completion_with("temperature", "NaN"), 400),
    Case("infinity-literal", completion_with("temperature", "Infinity"), 400),
    Case("float-1e999", completion_with("temperature", "1e999"), 400),
]

FIELDS = [
    Case("model-missing", request("POST", "/v1/completions", {"prompt": "x"}), 400),
    Case("model-int", completion(model=5), 400),
    Case("model-unknown", completion(model="../../etc/passwd"), 404, "model_not_found"),
    Case("prompt-object", completion(prompt={"a": 1}), 400),
    Case("prompt-mixed-list", completion(prompt=[[1, "x"]]), 400),
    Case("prompt-negative-id", completion(prompt=[-1]), 400),
    Case("prompt-huge-id", completion(prompt=[2**40]), 400),
    Case("prompt-float-ids", completion(prompt=[1.5, 2]), 400),
    Case("prompt-empty", completion(prompt=""), 400),
    Case("prompt-over-context", completion(prompt="日" * CONTEXT), 400, "context_length_exceeded"),
    Case("max-tokens-negative", completion(max_tokens=-5), 400),
    Case("max-tokens-1e20", completion(max_tokens=10**20), 400),
    Case("max-tokens-string", completion(max_tokens="many"), 400),
    Case("temperature-negative", completion(temperature=-1), 400),
    Case("temperature-string", completion(temperature="hot"), 400),
    Case("top-p-zero", completion(top_p=0), 400),
    Case("top-p-1.5", completion(top_p=1.5), 400),
    Case("n-100", completion(n=100), 400),
    Case("n-over-the-queue", completion(n=5), 429, "rate_limit_exceeded"),
    Case("stop-over-the-limit", completion(stop=[f"s{i}" for i in range(MAX_STOPS + 1)]), 400),
    Case("stop-empty-string", completion(stop=[""]), 400),
    Case("stop-int", completion(stop=123), 400),
    Case("seed-negative", completion(seed=-1), 400),
    Case("seed-2**64", completion(seed=2**64), 400),
    Case("stream-list", completion(stream=[1]), 400),
    Case("stream-options-int", completion(stream_options=5), 400),
    Case("user-object", completion(user={}), 400),
    Case("presence-penalty", completion(presence_penalty=1), 400),
    Case("logit-bias", completion(logit_bias={"1": 100}), 400),
    Case("messages-string", chat(messages="hi"), 400),
    Case("messages-empty", chat(messages=[]), 400),
    Case("message-without-content", chat(messages=[{"role": "user"}]), 400),
    Case("message-content-int", chat(messages=[{"role": "user", "content": 5}]), 400),
    Case("message-role-tool", chat(messages=[{"role": "tool", "content": "x"}]), 400),
    Case(
        "message-image-part",
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        400,
    ),
    Case("messages-500", chat(messages=USER * 500), 400, "context_length_exceeded"),
    Case("max-completion-tokens-zero", chat(max_completion_tokens=0), 400),
    Case("embeddings-empty-list", embeddings(input=[]), 400),
    Case("embeddings-empty-ids", embeddings(input=[[]]), 400),
    Case("embeddings-object", embeddings(input={"x": 1}), 400),
    Case("embeddings-negative-id", embeddings(input=[1, -5]), 400),
    Case("embeddings-over-context", embeddings(input="x" * CONTEXT), 400, "context_length_exceeded"),
    Case("embeddings-3000-inputs", embeddings(input=[[1]] * 3000), 400),
    Case("embeddings-dimensions", embeddings(dimensions=3), 400, "unsupported_parameter"),
    Case("embeddings-format", embeddings(encoding_format="int8"), 400),
]

CORPUS = PROTOCOL + AUTHORIZATION + ROUTES + BODIES + FIELDS


def exchange(port: int, raw: bytes, timeout: float = 60) -> tuple[int, dict, bytes]:
    """Send `raw` in pieces (stopping once the server has answered: it may close on a request it
    refuses midway), read the response (to its Content-Length, or its end); (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        for at in range(0, len(raw), 4096):
            try:
                s.sendall(raw[at : at + 4096])
            except OSError:  # the server answered and closed
                break
        data = b""
        try:
            while not complete(data) and (chunk := s.recv(1 << 16)):
                data += chunk
        except ConnectionResetError:  # it closed with our unread bytes: the answer came first
            pass
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in header_lines)}
    return int(status_line.split()[1]), headers, body


def complete(data: bytes) -> bool:
    """Whether `data` holds a whole response with a Content-Length."""
    head, sep, body = data.partition(b"\r\n\r\n")
    lengths = [line.split(b":")[1] for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
    return bool(sep and lengths) and len(body) >= int(lengths[0])


def auth_headers() -> dict:
    return {"Authorization": AUTH.split(b": ", 1)[1]}


def stream_text(server, prompt: str, max_tokens: int, **fields) -> str:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, **fields}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=auth_headers(), timeout=120) as r:
        assert r.status_code == 200, r.read()
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks), chunks
    return "".join(c["choices"][0]["text"] for c in chunks)


@pytest.fixture(scope="module")
def hostile(checkpoint):
    s = Server(checkpoint, "--api-key", KEY, "--max-batch", "2", "--max-queue", "2", "--max-body-bytes", "20000")
    yield s
    s.stop()


class LiveStream:
    """Another client: streams the same greedy completion again and again while the corpus runs."""

    def __init__(self, server):
        self.server, self.texts, self.errors = server, [], []
        self.expected = stream_text(server, "Once upon", 60)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stopping.is_set():
            try:
                self.texts.append(stream_text(self.server, "Once upon", 60))
            except Exception as e:  # reported by test_the_live_stream_was_unaffected
                self.errors.append(repr(e))

    def stop(self):
        self.stopping.set()
        self.thread.join(120)


@pytest.fixture(scope="module")
def live(hostile):
    stream = LiveStream(hostile)
    yield stream
    stream.stop()


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_hostile_request_gets_an_openai_error(hostile, live, case):
    status, headers, body = exchange(hostile.port, case.raw)
    assert status == case.status, body[:300]
    assert headers["content-type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    assert "\n" not in error["message"] and "Traceback" not in error["message"]
    if case.code:
        assert error["code"] == case.code
    assert httpx.get(hostile.url + "/health", timeout=10).json()["status"] == "ok"


def test_the_corpus_is_large_and_unique():
    assert len(CORPUS) >= 60 and len({c.name for c in CORPUS}) == len(CORPUS)


def test_the_live_stream_was_unaffected(live):
    """Runs after the corpus: every stream the other client ran meanwhile got its text, whole."""
    live.stop()
    assert not live.errors
    assert live.texts and all(text == live.expected for text in live.texts)


def test_a_utf8_key_works_as_bearer_and_basic(hostile):
    r = httpx.post(
        hostile.url + "/v1/completions",
        json={"model": MODEL, "prompt": "x", "max_tokens": 2},
        headers=auth_headers(),
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    basic = b"Basic " + base64.b64encode(b"user:" + KEY.encode())
    assert httpx.get(hostile.url + "/", headers={"Authorization": basic}, timeout=30).status_code == 200


def test_embeddings_count_against_the_queue_limit(hostile):
    """Four sequences fill the server (2 rows + 2 queued): an embeddings request is refused with a 429.
    The tiny model can finish all four (2 x 94 tokens a row) before the request arrives on two busy
    cores; a 200 is then no evidence either way, so up to three tries: a server that never counts
    embeddings against the queue answers 200 to all of them."""
    body = {"model": MODEL, "prompt": "a", "max_tokens": CONTEXT - 2, "temperature": 0, "stream": True, "n": 4}
    for _ in range(3):
        with httpx.stream("POST", hostile.url + "/v1/completions", json=body, headers=auth_headers(), timeout=60) as r:
            next(r.iter_lines())  # the four sequences are in
            status, _, answer = exchange(hostile.port, embeddings())
        if status != 200:
            break
    assert status == 429 and json.loads(answer)["error"]["code"] == "rate_limit_exceeded"


def test_tiny_temperatures_beside_three_streams(hostile):
    """Three healthy streams and requests with tiny temperatures (once: a 500, and an error event in
    every stream): all complete, each stream with its text alone, each tiny one with the greedy text."""
    prompts = ["The ", "And ", "But "]
    alone = [stream_text(hostile, p, 40) for p in prompts]
    greedy = stream_text(hostile, "x", 3)
    got: dict = {}
    threads = [
        threading.Thread(target=lambda i=i: got.update({i: stream_text(hostile, prompts[i], 40)})) for i in range(3)
    ]
    for t in threads:
        t.start()
    for temperature in (1e-40, 1e-300, 5e-324):
        tiny = {"model": MODEL, "prompt": "x", "max_tokens": 3, "temperature": temperature}
        r = httpx.post(hostile.url + "/v1/completions", json=tiny, headers=auth_headers(), timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy, (temperature, r.text)
    for t in threads:
        t.join(120)
    assert [got.get(i) for i in range(3)] == alone
