"""A checkpoint's chat template cannot hold up the server: a template that divides by zero or loops
for 10^10 steps answers its chat request with a 422 naming the template, while /health, a concurrent
stream and SIGTERM all keep working; a malformed tokenizer_config.json refuses chat requests only."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("jinja2")

from serving import Server  # noqa: E402

from nanoseek.serve.protocol import APIError  # noqa: E402
from nanoseek.serve.templates import ServedTemplate  # noqa: E402

NESTED_LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
TEMPLATE = (
    "{% set text = messages[-1]['content'] %}"
    "{% if text == 'loop' %}" + NESTED_LOOP + "{% elif text == 'zero' %}{{ 1/0 }}"
    "{% else %}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def templated(checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("templated") / "tiny-chat"
    shutil.copytree(checkpoint, folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    s = Server(folder)
    yield s
    s.stop()


def chat(server, content: str, **kw):
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **kw}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)


def test_the_template_renders(templated):
    r = chat(templated, "hi", temperature=0)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len("user: hi\nassistant:")


def test_a_failing_template_is_a_422_naming_it(templated):
    r = chat(templated, "zero")
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "chat_template_error" and err["param"] == "messages"
    assert "tokenizer_config.json" in err["message"] and "ZeroDivisionError" in err["message"]


def test_a_template_that_never_ends_holds_up_nobody(templated):
    stream_body = {"model": "tiny-chat", "prompt": "ab", "max_tokens": 30, "temperature": 0}
    alone = httpx.post(templated.url + "/v1/completions", json=stream_body, timeout=60).json()["choices"][0]["text"]
    looping: dict = {}
    thread = threading.Thread(target=lambda: looping.update(r=chat(templated, "loop")))
    thread.start()
    healthy = []
    while thread.is_alive():  # /health answers all along the render
        healthy.append(httpx.get(templated.url + "/health", timeout=5).status_code)
        with httpx.stream("POST", templated.url + "/v1/completions", json={**stream_body, "stream": True}) as r:
            text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in r.iter_lines() if e[6:9] == '{"i')
        assert text == alone
    thread.join()
    assert healthy and set(healthy) == {200}
    r = looping["r"]
    assert r.status_code == 422 and "did not finish rendering within 2 s" in r.json()["error"]["message"]
    assert chat(templated, "hi").status_code == 200  # a fresh worker renders the next request


def test_sigterm_stops_the_server_during_a_runaway_render(templated):
    thread = threading.Thread(target=lambda: chat(templated, "loop"), daemon=True)
    thread.start()
    time.sleep(0.3)  # the render has started
    start = time.monotonic()
    templated.proc.send_signal(signal.SIGTERM)
    templated.proc.wait(30)
    assert time.monotonic() - start < 30


@pytest.mark.parametrize(
    "content,message",
    [
        (json.dumps({"chat_template": 5}), "chat_template must be a string"),
        (json.dumps(["a", "list"]), "must hold a JSON object, not a list"),
        (b"\xff{}", "is not UTF-8 text"),
    ],
)
def test_a_malformed_tokenizer_config_refuses_chat_requests_only(tmp_path, content, message):
    (tmp_path / "tokenizer_config.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    served = ServedTemplate(tmp_path)
    with pytest.raises(APIError) as info:
        asyncio.run(served.render([{"role": "user", "content": "hi"}]))
    assert info.value.status == 422 and info.value.code == "chat_template_error"
    assert message in info.value.message and str(tmp_path) not in info.value.message
    assert "tokenizer_config.json" in info.value.message
