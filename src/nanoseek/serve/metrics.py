"""GET /metrics: the server's counters in Prometheus' text format (prometheus-client).

    nanoseek_requests_total{route, code}        HTTP requests answered, by route and status code
    nanoseek_prompt_tokens_total                prompt tokens prefilled
    nanoseek_generation_tokens_total            tokens generated
    nanoseek_requests_running                   sequences holding a cache row now
    nanoseek_requests_waiting                   sequences queued for a row (queue depth)
    nanoseek_batch_occupancy                    running / max_batch, now
    nanoseek_decode_batch_size                  histogram: rows advanced by each decode step
    nanoseek_time_to_first_token_seconds        histogram: arrival -> first token, per sequence
    nanoseek_time_per_output_token_seconds      histogram: the gap between consecutive tokens
    nanoseek_request_latency_seconds            histogram: arrival -> last token, per sequence
    nanoseek_prefix_cache_queries_total         prompt tokens looked up in the prefix cache
    nanoseek_prefix_cache_hits_total            ... of which the cache held the entries (not prefilled)
    nanoseek_prefix_cache_hit_rate              hits / queries since the start (0 before any query)
    nanoseek_prefix_cache_requests_total{result}  prompts looked up: "hit" (one block or more) or "miss"
    nanoseek_prefix_cache_evictions_total       blocks evicted to stay under the bound
    nanoseek_prefix_cache_bytes, _blocks        what the prefix cache holds now
    nanoseek_decode_compiled                    1 when the decode step runs compiled, else 0
    nanoseek_prefill_compiled                   1 when short prompts are prefilled compiled, else 0

The prefix cache's series exist only when the server has one; tokens are counted as vLLM counts
its prefix-cache queries and hits.

Each app has its own registry (two servers in one process do not mix counts). The engine reports
through the `EngineObserver` hooks; HTTP requests are counted by an ASGI wrapper around the whole
app, so refusals (401, 413, 429) count too. Routes outside the app's own are counted as "other",
so a scanner's random paths do not create unbounded label values.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from nanoseek.serve.engine import EngineObserver

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # the classic text format every Prometheus scrapes
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics(EngineObserver):
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.routes: set[str] = set()  # the app's paths, set once its routes exist
        self.requests = Counter("nanoseek_requests", "HTTP requests answered", ["route", "code"], registry=r)
        self.prompt_tokens = Counter("nanoseek_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("nanoseek_generation_tokens", "Tokens generated", registry=r)
        self.running = Gauge("nanoseek_requests_running", "Sequences holding a cache row", registry=r)
        self.waiting = Gauge("nanoseek_requests_waiting", "Sequences queued for a cache row", registry=r)
        self.occupancy = Gauge("nanoseek_batch_occupancy", "Running sequences / max_batch", registry=r)
        self.batch = Histogram(
            "nanoseek_decode_batch_size", "Rows advanced by one decode step", buckets=BATCH_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "nanoseek_time_to_first_token_seconds",
            "Arrival to first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "nanoseek_time_per_output_token_seconds",
            "Time between consecutive tokens of a sequence",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "nanoseek_request_latency_seconds", "Arrival to last token", buckets=LATENCY_BUCKETS, registry=r
        )

    def watch(self, engine) -> None:
        """Read the gauges from `engine.stats()` at each scrape (an Engine, or an EngineProcess's last
        report from its child)."""
        self.running.set_function(lambda: engine.stats()["running"])
        self.waiting.set_function(lambda: engine.stats()["waiting"])
        self.occupancy.set_function(lambda: engine.stats()["running"] / engine.max_batch)
        compiled = Gauge("nanoseek_decode_compiled", "1 when the decode step runs compiled", registry=self.registry)
        compiled.set_function(lambda: float(engine.stats()["compiled"]))
        prefill = Gauge("nanoseek_prefill_compiled", "1 when short prompts prefill compiled", registry=self.registry)
        prefill.set_function(lambda: float(engine.stats().get("compiled_prefill", False)))
        self.registry.register(PrefixCacheCollector(engine.stats))

    # ------------------------------------------------------------ the engine's hooks (engine thread)
    def prefilled(self, seq) -> None:
        self.prompt_tokens.inc(len(seq.prompt_ids))

    def decoded(self, rows: int) -> None:
        self.batch.observe(rows)

    def token(self, seq, finished: bool) -> None:
        now = time.monotonic()
        last = getattr(seq, "last_token_at", None)
        if last is None:
            self.ttft.observe(now - seq.arrival)
        else:
            self.tpot.observe(now - last)
        seq.last_token_at = now
        self.generation_tokens.inc()
        if finished:
            self.latency.observe(now - seq.arrival)

    # ------------------------------------------------------------ HTTP
    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def count_requests(self, app):
        """The ASGI app wrapped so that every HTTP response is counted by route and status."""

        async def counted(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            route = scope["path"] if scope["path"] in self.routes else "other"
            status = {"code": "500"}

            async def send_counted(message):
                if message["type"] == "http.response.start":
                    status["code"] = str(message["status"])
                await send(message)

            try:
                await app(scope, receive, send_counted)
            finally:
                self.requests.labels(route, status["code"]).inc()

        return counted


class PrefixCacheCollector:
    """The prefix cache's counters, read from the engine's statistics at each scrape (the engine keeps them)."""

    def __init__(self, stats):
        self.stats = stats  # () -> the engine's stats, with the prefix cache's summary

    def collect(self):
        s = self.stats()
        if "prefix_cache_queried_tokens" not in s:  # no prefix cache
            return []
        queries = CounterMetricFamily("nanoseek_prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        queries.add_metric([], s["prefix_cache_queried_tokens"])
        hits = CounterMetricFamily("nanoseek_prefix_cache_hits", "Prompt tokens whose entries the prefix cache held")
        hits.add_metric([], s["prefix_cache_hit_tokens"])
        requests = CounterMetricFamily(
            "nanoseek_prefix_cache_requests", "Prompts looked up, by result", labels=["result"]
        )
        requests.add_metric(["hit"], s["prefix_cache_hits"])
        requests.add_metric(["miss"], s["prefix_cache_lookups"] - s["prefix_cache_hits"])
        evictions = CounterMetricFamily("nanoseek_prefix_cache_evictions", "Blocks evicted from the prefix cache")
        evictions.add_metric([], s["prefix_cache_evictions"])
        rate = GaugeMetricFamily("nanoseek_prefix_cache_hit_rate", "Prefix cache hits / queries, in tokens")
        queried = s["prefix_cache_queried_tokens"]
        rate.add_metric([], s["prefix_cache_hit_tokens"] / queried if queried else 0.0)
        held = GaugeMetricFamily("nanoseek_prefix_cache_bytes", "Bytes the prefix cache holds")
        held.add_metric([], s["prefix_cache_bytes"])
        blocks = GaugeMetricFamily("nanoseek_prefix_cache_blocks", "Blocks the prefix cache holds")
        blocks.add_metric([], s["prefix_cache_blocks"])
        return [queries, hits, requests, evictions, rate, held, blocks]
