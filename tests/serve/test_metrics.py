"""GET /metrics: Prometheus' text format, counting what the server did."""

from __future__ import annotations

import pytest

httpx = pytest.importorskip("httpx")
parser = pytest.importorskip("prometheus_client.parser")


def scrape(server) -> dict:
    r = httpx.get(server.url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in parser.text_string_to_metric_families(r.text)
        for s in f.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_tokens_and_latencies(server):
    before = scrape(server)
    body = {"model": "tiny-chat", "prompt": "Hello", "max_tokens": 7, "temperature": 0}
    out = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    httpx.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=60)
    after = scrape(server)

    def grew(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("nanoseek_requests_total", route="/v1/completions", code="200") == 1
    assert grew("nanoseek_requests_total", route="/v1/completions", code="404") == 1
    assert grew("nanoseek_prompt_tokens_total") == out["usage"]["prompt_tokens"] == 5
    assert grew("nanoseek_generation_tokens_total") == out["usage"]["completion_tokens"]
    assert grew("nanoseek_time_to_first_token_seconds_count") == 1
    assert grew("nanoseek_time_per_output_token_seconds_count") == out["usage"]["completion_tokens"] - 1
    assert grew("nanoseek_request_latency_seconds_count") == 1
    assert grew("nanoseek_decode_batch_size_count") >= out["usage"]["completion_tokens"] - 1
    assert value(after, "nanoseek_requests_waiting") == 0 and value(after, "nanoseek_batch_occupancy") == 0


def test_unknown_paths_share_one_label(server):
    httpx.get(server.url + "/no/such/path/12345", timeout=30)
    samples = scrape(server)
    assert value(samples, "nanoseek_requests_total", route="other", code="404") >= 1
    assert not any("12345" in str(key) for key in samples)


def test_prefix_cache_hits_and_hit_rate(server):
    """The server's default prefix cache: a prompt that repeats another's first 64 characters (two
    blocks of 32 tokens of the character tokenizer) is served them from the cache."""
    before = scrape(server)
    shared = "You are a helpful assistant. Answer in one short line, politely! "  # 65 characters
    cached = []
    for question in ("Hi", "Who are you"):
        body = {"model": "tiny-chat", "prompt": shared + question, "max_tokens": 2, "temperature": 0}
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert cached == [0, 64]  # as OpenAI's usage reports them
    after = scrape(server)

    def grew(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("nanoseek_prefix_cache_queries_total") == 2 * len(shared) + len("Hi") + len("Who are you")
    assert grew("nanoseek_prefix_cache_hits_total") == 64
    assert grew("nanoseek_prefix_cache_requests_total", result="hit") == 1
    assert grew("nanoseek_prefix_cache_requests_total", result="miss") == 1
    hits, queries = (
        value(after, "nanoseek_prefix_cache_hits_total"),
        value(after, "nanoseek_prefix_cache_queries_total"),
    )
    assert value(after, "nanoseek_prefix_cache_hit_rate") == pytest.approx(hits / queries)
    assert value(after, "nanoseek_prefix_cache_blocks") >= 2 and value(after, "nanoseek_prefix_cache_bytes") > 0
    assert value(after, "nanoseek_decode_compiled") == 0  # the test servers run --no-compile
    assert value(after, "nanoseek_prefill_compiled") == 0
