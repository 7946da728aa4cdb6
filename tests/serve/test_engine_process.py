"""The engine in a process of its own (serve/engine_process.py) answers exactly as the engine thread does."""

from __future__ import annotations

import time
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient
from serving import CONTEXT

from nanoseek.generation.sampling import SamplingOptions
from nanoseek.serve import app as app_module
from nanoseek.serve.app import create_app
from nanoseek.serve.engine import QueueFull, Sequence
from nanoseek.serve.engine_process import EngineProcess

SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 3}},
    "required": ["a", "b"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def clients(local):
    """(thread, process): TestClients of one model's app, its engine on a thread and in a child process."""
    model, tok = local
    made = []
    for own_process in (False, True):
        options = {"max_batch": 3, "max_queue": 4, "prefix_cache_bytes": 1 << 20, "engine_process": own_process}
        app = create_app(model, tok, "tiny", **options)
        made.append(TestClient(app).__enter__())
    yield made
    for c in made:
        c.__exit__(None, None, None)


def answer(client, path: str, body: dict) -> dict:
    r = client.post(path, json={"model": "tiny", **body})
    assert r.status_code == 200, r.text
    out = r.json()
    for key in ("id", "created"):
        out.pop(key, None)
    return out


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": ["ab", "ba ab"], "max_tokens": 8, "temperature": 0, "logprobs": 3, "echo": True},
        {"prompt": "abc", "max_tokens": 12, "temperature": 0.9, "seed": 5, "n": 2},
        {
            "prompt": "a",
            "max_tokens": 30,
            "temperature": 0.7,
            "seed": 1,
            "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}},
        },
    ],
)
def test_completions_equal_the_engine_threads(clients, body):
    thread, process = clients
    assert answer(process, "/v1/completions", body) == answer(thread, "/v1/completions", body)


def test_streams_equal_the_engine_threads(clients):
    body = {"model": "tiny", "prompt": "ab", "max_tokens": 10, "temperature": 0.8, "seed": 3, "stream": True}
    texts = []
    for client in clients:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        texts.append([line.split('"text": ')[1].split(", ")[0] for line in r.text.splitlines() if '"text"' in line])
    assert texts[0] == texts[1] and len(texts[0]) > 1


def test_embeddings_equal_the_engine_threads(clients):
    thread, process = (answer(c, "/v1/embeddings", {"input": ["ab a", "b"]}) for c in clients)
    for got, want in zip(process["data"], thread["data"]):
        assert got["embedding"] == pytest.approx(want["embedding"], abs=1e-6)


def test_health_and_metrics_come_from_the_child(clients):
    _, process = clients
    answer(process, "/v1/completions", {"prompt": "ab", "max_tokens": 4, "temperature": 0})
    health = process.get("/health").json()
    assert health["status"] == "ok" and health["running"] == 0 and health["tokens_generated"] >= 4
    assert health["prefix_cache_lookups"] >= 1
    metrics = process.get("/metrics").text
    lines = metrics.splitlines()
    tokens = float(next(line.split()[-1] for line in lines if line.startswith("nanoseek_generation_tokens")))
    assert tokens == health["tokens_generated"]
    assert "nanoseek_time_to_first_token_seconds_count" in metrics and "nanoseek_prefix_cache_requests" in metrics


def test_admission_is_counted_in_the_parent(local):
    """max_batch + max_queue places: the next submit is refused before anything reaches the child."""
    model, tok = local
    engine = EngineProcess(model, tok, max_batch=1, max_queue=1)  # not started: nothing reads the pipe
    seq = [Sequence([1], 4, SamplingOptions(temperature=0), lambda e: None) for _ in range(3)]
    engine.submit(seq[:1])
    engine.reserve()
    with pytest.raises(QueueFull, match="embedding"):
        engine.submit(seq[1:2])
    engine.unreserve()
    engine.submit(seq[1:2])
    assert engine.stats()["embedding"] == 0 and len(engine.live) == 2


@contextmanager
def served_in_a_process(local, monkeypatch):
    """(a TestClient of an app whose engine runs in a child process, that EngineProcess)."""
    made = []

    def make(*args, **kwargs):
        made.append(EngineProcess(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(app_module, "EngineProcess", make)
    model, tok = local
    with TestClient(create_app(model, tok, "tiny", max_batch=2, max_queue=2, engine_process=True)) as client:
        yield client, made[0]


def wait_until(condition, client, seconds: float) -> None:
    """Poll `condition` while the app's loop gets to run (each request lets it read the child's pipe)."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        client.get("/v1/models")
        time.sleep(0.05)


def test_a_dead_engine_process_fails_requests_and_health(local, monkeypatch):
    with served_in_a_process(local, monkeypatch) as (client, engine):
        engine.process.kill()
        wait_until(lambda: engine.dead is not None, client, 20)
        assert engine.dead is not None
        r = client.get("/health")
        assert r.status_code == 503 and "engine process" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "ab", "max_tokens": 3})
        assert r.status_code == 503 and "engine process" in r.json()["error"]["message"]


def test_cancelled_requests_free_their_rows(local, monkeypatch):
    """A stream the client leaves is cancelled in the child; the parent's count and the child's rows drop to 0."""
    with served_in_a_process(local, monkeypatch) as (client, engine):
        body = {"model": "tiny", "prompt": "ab", "max_tokens": CONTEXT, "temperature": 0, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as r:
            next(r.iter_lines())
        wait_until(lambda: not engine.live and engine.stats()["running"] == 0, client, 30)
        assert not engine.live and engine.stats()["running"] == 0


def test_the_engine_process_is_the_default_for_a_cpu_model_on_two_cores(local, monkeypatch):
    import os

    from nanoseek.cli.serve import default_engine_process

    model, _ = local
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert default_engine_process(model)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert not default_engine_process(model)


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="no CPU affinity here")
def test_the_engine_takes_the_last_cores_and_the_loop_the_others(monkeypatch):
    import os

    from nanoseek.serve.engine_process import split_cores

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 0, 2, 6})
    assert split_cores(1) == ([6], [0, 2, 4])
    assert split_cores(3) == ([2, 4, 6], [0])
    assert split_cores(4) is None  # no core left for the loop: nothing is pinned
