"""`nanoseek bench serve`: concurrent streaming clients against a real server on loopback.

For each engine (`--engines`, default the compiled one and the eager one: `nanoseek serve --compile`
and `--no-compile`, the same checkpoint) and each client count c (default 1, 4, 16), c clients each
loop for `seconds`: send a streaming /v1/completions request (max_tokens new tokens, temperature
0.8, a fixed prompt, the usage chunk on), read it to `[DONE]`, send the next. Measured per level:

    requests_per_s, tokens_per_s   finished requests and output tokens (from `usage`) per second
    ttft_p50_ms / ttft_p99_ms      request sent -> first text chunk
    itl_p50_ms / itl_p99_ms        gaps between consecutive text chunks of one stream
    errors                         non-200 answers, broken streams and client exceptions
    server_rss_mib_before/after    the server process's resident memory around the level
    startup_s                      server start to its first /health answer (the compile warm-up)

`--peers hf` adds transformers' batched `generate` on the same weights (the checkpoint exported to
the HF format), in this process with the server's thread count: c copies of the prompt as one
batch, max_tokens new tokens each, sampled at the same temperature, for `seconds`; no HTTP, no
server. Ratio lines give, per client count, each engine's tokens/s over the eager engine's and over
transformers', and each engine's largest client count over one client.

Prefix cache (`--prefix-tokens N`, default 1024; 0 skips it): time to first token of a request whose
first N tokens another request sent just before (a hit: the prefix cache holds them) against one
whose N tokens are new (a miss), `--ttft-rounds` pairs, each pair with a new random excerpt of the
corpus as its shared "system prompt" and two different questions, one new token each, all sent on
one kept-alive connection (as an API client keeps it: the time is the server's, not that of opening
a connection and building an HTTP client, tens of milliseconds in Python). A random
checkpoint (no CKPT) gets a context long enough for it; this phase runs on its own eager server
(decoding does not enter the time to the first token).

The server is started here (`nanoseek serve CKPT`, `--max-batch` rows) unless `--url` points at a
running one. The clients share the machine with the server: on 2 cores the client loop costs the
server some CPU, alike at every level.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nanoseek.bench.common import cpu_name
from nanoseek.config import ModelConfig
from nanoseek.data import BUNDLED_CORPUS
from nanoseek.data.tokenizer import CharTokenizer
from nanoseek.errors import NanoseekError
from nanoseek.model import Transformer

MIB = 1 << 20


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def process_rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_checkpoint(preset: str, folder: Path, context: int | None = None) -> Path:
    """A randomly initialized `preset` with the bundled corpus's character tokenizer (speed only);
    `context`: at least that many positions."""
    import torch

    corpus = BUNDLED_CORPUS
    tok = CharTokenizer.train([corpus.read_text()])
    torch.manual_seed(0)
    config = ModelConfig.from_preset(preset).replace(vocab_size=tok.vocab_size)
    if context and context > config.max_position_embeddings:
        config = config.replace(max_position_embeddings=context)
    Transformer(config).save_pretrained(folder)
    tok.save(folder)
    return folder


class ServerProcess:
    def __init__(self, ckpt: Path, max_batch: int, threads: int, flags: tuple[str, ...] = ()):
        self.started = time.perf_counter()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [
            sys.executable,
            "-m",
            "nanoseek",
            "serve",
            str(ckpt),
            "--port",
            str(self.port),
            "--max-batch",
            str(max_batch),
            "--max-queue",
            "256",
            "--model-name",
            "bench",
        ]
        if threads:
            args += ["--threads", str(threads)]
        args += list(flags)
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.pid = self.proc.pid

    def wait_ready(self, httpx, timeout: float = 120) -> float:
        """Seconds from the start to the first /health answer (the compiled engine's warm-up included)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise NanoseekError(f"the server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return round(time.perf_counter() - self.started, 1)
            except httpx.HTTPError:
                time.sleep(0.25)
        raise NanoseekError(f"the server did not answer /health within {timeout:g} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one_stream(http, url: str, body: dict, stats: dict) -> None:
    sent = time.perf_counter()
    last = None
    try:
        async with http.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                fail(stats, f"HTTP {r.status_code}: {r.text[:200]}")
                return
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    stats["tokens"] += chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0]["text"]:
                    now = time.perf_counter()
                    if last is None:
                        stats["ttft"].append(now - sent)
                    else:
                        stats["itl"].append(now - last)
                    last = now
            if done:
                stats["requests"] += 1
            else:
                fail(stats, "the stream ended without data: [DONE]")
    except Exception as e:  # a broken connection counts as an error, the run goes on
        fail(stats, f"{type(e).__name__}: {e}")


def fail(stats: dict, message: str) -> None:
    stats["errors"] += 1
    if len(stats["error_samples"]) < 5:
        stats["error_samples"].append(message)


async def run_level(url: str, clients: int, seconds: float, body: dict, headers: dict) -> dict:
    import httpx

    stats = {"requests": 0, "tokens": 0, "errors": 0, "error_samples": [], "ttft": [], "itl": []}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits, headers=headers) as http:
        stop_at = time.perf_counter() + seconds

        async def client(i: int):
            n = 0
            while time.perf_counter() < stop_at:
                await one_stream(http, url, {**body, "seed": 1000 * i + n}, stats)
                n += 1

        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed = time.perf_counter() - start
    ms = 1000.0
    return {
        "requests": stats["requests"],
        "errors": stats["errors"],
        "error_samples": stats["error_samples"],
        "wall_s": round(elapsed, 2),
        "requests_per_s": round(stats["requests"] / elapsed, 3),
        "tokens_per_s": round(stats["tokens"] / elapsed, 1),
        "ttft_p50_ms": _ms(percentile(stats["ttft"], 50), ms),
        "ttft_p99_ms": _ms(percentile(stats["ttft"], 99), ms),
        "itl_p50_ms": _ms(percentile(stats["itl"], 50), ms),
        "itl_p99_ms": _ms(percentile(stats["itl"], 99), ms),
        "itl_mean_ms": _ms(statistics.fmean(stats["itl"]) if stats["itl"] else None, ms),
    }


def _ms(value: float | None, scale: float) -> float | None:
    return None if value is None else round(value * scale, 2)


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", nargs="?", help="checkpoint to serve (default: a random --preset model)")
    parser.add_argument("--preset", default="deepseek-v3-mini", help="model when no CKPT is given")
    parser.add_argument("--url", help="bench a running server instead of starting one")
    parser.add_argument("--server-pid", type=int, help="with --url: the server's pid, for its RSS")
    parser.add_argument("--api-key", default=os.environ.get("NANOSEEK_API_KEY"))
    parser.add_argument("--clients", default="1,4,16", help="comma-separated concurrent client counts")
    parser.add_argument("--seconds", type=float, default=30.0, help="duration of each level")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--prompt", default="ROMEO:\nWhat light through yonder window breaks?\n")
    parser.add_argument("--max-batch", type=int, default=16, help="rows of the started server")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads of the started server (0: serve's default, cores - 1)"
    )
    parser.add_argument(
        "--engines",
        default="compiled,eager",
        help="comma-separated servers to start: compiled (--compile), eager (--no-compile), compiled-thread and "
        "eager-thread (the same with --no-engine-process)",
    )
    parser.add_argument("--peers", default="", help="comma-separated: hf (transformers' batched generate), or empty")
    parser.add_argument(
        "--prefix-tokens", type=int, default=1024, help="shared prefix of the hit/miss TTFT phase (0: skip it)"
    )
    parser.add_argument("--ttft-rounds", type=int, default=10, help="hit/miss request pairs of the TTFT phase")
    parser.add_argument(
        "--startup-timeout", type=float, default=1800.0, help="seconds a started server may take (compiling)"
    )


ENGINE_FLAGS = {  # the engine in its own process where serve puts it by default (two cores or more)
    "compiled": ("--compile",),
    "eager": ("--no-compile",),
    "compiled-thread": ("--compile", "--no-engine-process"),
    "eager-thread": ("--no-compile", "--no-engine-process"),
}


def parse_options(args: argparse.Namespace) -> tuple[list[int], list[str], list[str]]:
    """(client counts, engines, peers), each checked."""
    try:
        levels = [int(c) for c in args.clients.split(",")]
    except ValueError:
        raise NanoseekError(f"--clients={args.clients!r} must be comma-separated integers like 1,4,16") from None
    if not levels or min(levels) < 1 or args.seconds <= 0 or args.max_tokens < 1:
        raise NanoseekError("--clients must be >= 1 each, --seconds > 0 and --max-tokens >= 1")
    engines = [e for e in args.engines.split(",") if e]
    if not engines or any(e not in ENGINE_FLAGS for e in engines):
        raise NanoseekError(f"--engines={args.engines!r}: comma-separated names of {', '.join(ENGINE_FLAGS)}")
    peers = [p for p in args.peers.split(",") if p]
    if any(p != "hf" for p in peers):
        raise NanoseekError(f"--peers={args.peers!r}: hf, or empty for none")
    if args.prefix_tokens < 0 or args.ttft_rounds < 1:
        raise NanoseekError("--prefix-tokens must be >= 0 (0 skips the TTFT phase) and --ttft-rounds >= 1")
    return levels, engines, peers


def run_serve(args: argparse.Namespace) -> list[dict]:
    try:
        import httpx
    except ImportError:
        raise NanoseekError("bench serve needs httpx (pip install 'nanoseek[serve]')") from None
    levels, engines, peers = parse_options(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if args.url:  # a running server: its levels and its prefix cache
        results = bench_levels(httpx, args, args.url, args.server_pid, levels, headers, "nanoseek")
        if args.prefix_tokens:
            results.append(bench_prefix_ttft(httpx, args, args.url, headers))
        return results + ratios(results, levels)
    with tempfile.TemporaryDirectory(prefix="nanoseek-bench-serve-") as tmp:
        ckpt = Path(args.ckpt) if args.ckpt else random_checkpoint(args.preset, Path(tmp) / "model")
        results = []
        for engine in engines:
            server = ServerProcess(ckpt, args.max_batch, args.threads, ENGINE_FLAGS[engine])
            try:
                startup = server.wait_ready(httpx, args.startup_timeout)
                rows = bench_levels(httpx, args, server.url, server.pid, levels, headers, f"nanoseek-{engine}")
            finally:
                server.stop()
            results += [{**r, "startup_s": startup} for r in rows]
        if peers:
            results += hf_generate_levels(ckpt, args, levels)
        if args.prefix_tokens:
            results.append(prefix_ttft_on_own_server(httpx, args, Path(tmp), headers))
    return results + ratios(results, levels)


def bench_levels(httpx, args, url: str, pid: int | None, levels: list[int], headers: dict, impl: str) -> list[dict]:
    """One result per client count against the server at `url` (after an unreported warm-up level)."""
    model = httpx.get(url + "/v1/models", headers=headers, timeout=10).json()["data"][0]["id"]
    body = {
        "model": model,
        "prompt": args.prompt,
        "max_tokens": args.max_tokens,
        "temperature": 0.8,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    asyncio.run(run_level(url, 1, min(3.0, args.seconds), body, headers))  # warm-up, not reported
    results = []
    for clients in levels:
        before = process_rss_mib(pid)
        figures = asyncio.run(run_level(url, clients, args.seconds, body, headers))
        results.append(
            {
                "bench": "serve",
                "impl": impl,
                "clients": clients,
                "seconds": args.seconds,
                "max_tokens": args.max_tokens,
                **figures,
                "server_rss_mib_before": before,
                "server_rss_mib_after": process_rss_mib(pid),
                "machine": _machine(args.threads),
            }
        )
    return results


def ratios(results: list[dict], levels: list[int]) -> list[dict]:
    """Per client count: each impl's tokens/s over the eager engine's and over transformers'; per impl:
    its largest client count over one client."""
    by = {(r["impl"], r["clients"]): r["tokens_per_s"] for r in results if r.get("bench") == "serve"}
    impls = list(dict.fromkeys(impl for impl, _ in by))
    rows = []
    for clients in levels:
        row = {}
        for base in ("nanoseek-eager", "nanoseek-eager-thread", "hf-generate"):
            if by.get((base, clients)):
                for impl in impls:
                    if impl != base and (impl, clients) in by:
                        row[f"{impl}_over_{base}"] = round(by[(impl, clients)] / by[(base, clients)], 2)
        if row:
            rows.append({"bench": "serve", "impl": "ratio", "clients": clients, **row})
    top = max(levels)
    for impl in impls:
        if top > 1 and by.get((impl, 1)) and (impl, top) in by:
            rows.append(
                {
                    "bench": "serve",
                    "impl": "ratio",
                    "of": impl,
                    f"tokens_per_s_{top}_over_1": round(by[(impl, top)] / by[(impl, 1)], 2),
                }
            )
    return rows


# ---------------------------------------------------------------------------- transformers' generate


def hf_generate_levels(ckpt: Path, args, levels: list[int]) -> list[dict]:
    """transformers' batched `generate` on the checkpoint's weights: c copies of the prompt, sampled."""
    import torch

    try:
        import transformers
    except ImportError:
        raise NanoseekError("--peers hf needs transformers (pip install 'nanoseek[bench]')") from None
    from nanoseek.io import load_checkpoint

    transformers.logging.set_verbosity_error()  # its load report lists the MTP layers it ignores
    threads = args.threads or max(1, (os.cpu_count() or 2) - 1)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # the server's share of the machine
    try:
        with tempfile.TemporaryDirectory(prefix="nanoseek-bench-hf-") as tmp, quiet():
            model, tokenizer, _ = load_checkpoint(ckpt)  # a run folder too
            model.save_pretrained(tmp, format="hf")
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        ids = tokenizer.encode(args.prompt)
        results = []
        for clients in levels:
            batch = torch.tensor([ids] * clients)
            generate_batch(hf, batch, args.max_tokens)  # warm-up
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < args.seconds:
                generate_batch(hf, batch, args.max_tokens)
                calls += 1
            elapsed = time.perf_counter() - start
            results.append(
                {
                    "bench": "serve",
                    "impl": "hf-generate",
                    "clients": clients,
                    "seconds": args.seconds,
                    "max_tokens": args.max_tokens,
                    "batches": calls,
                    "wall_s": round(elapsed, 2),
                    "tokens_per_s": round(calls * clients * args.max_tokens / elapsed, 1),
                    "transformers": transformers.__version__,
                    "machine": _machine(args.threads),
                }
            )
        return results
    finally:
        torch.set_num_threads(previous)


def quiet():
    """stdout and stderr swallowed: the bench's stdout holds JSON lines only."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


def generate_batch(hf, batch, new: int) -> None:
    import torch

    with torch.inference_mode():
        out = hf.generate(
            batch,
            attention_mask=torch.ones_like(batch),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=True,
            temperature=0.8,
            top_k=0,
            pad_token_id=0,
            eos_token_id=None,
        )
    assert out.shape[1] == batch.shape[1] + new


# ---------------------------------------------------------------------------- prefix cache: TTFT hit vs miss


def prefix_ttft_on_own_server(httpx, args, tmp: Path, headers: dict) -> dict:
    """The TTFT phase on an eager server of its own, its checkpoint's context long enough."""
    need = args.prefix_tokens + 64
    if args.ckpt:
        ckpt = Path(args.ckpt)
    else:
        ckpt = random_checkpoint(args.preset, tmp / "long-context", context=1 << (need - 1).bit_length())
    server = ServerProcess(ckpt, 1, args.threads, ENGINE_FLAGS["eager"])
    try:
        server.wait_ready(httpx, args.startup_timeout)
        return bench_prefix_ttft(httpx, args, server.url, headers)
    finally:
        server.stop()


def bench_prefix_ttft(httpx, args, url: str, headers: dict) -> dict:
    """Median TTFT of requests whose first `prefix_tokens` tokens the previous request sent (hits) and
    of requests whose prefix is new (misses); the prompts go as token ids, so the lengths are exact."""
    model = httpx.get(url + "/v1/models", headers=headers, timeout=10).json()["data"][0]
    context = model.get("context_length") or 0
    if context and args.prefix_tokens + 16 > context:
        raise NanoseekError(
            f"--prefix-tokens {args.prefix_tokens} does not fit the model's context of {context} positions"
        )
    text = BUNDLED_CORPUS.read_text()
    tokens = tokenize(httpx, url, headers, text[: 8 * args.prefix_tokens + 4096])
    questions = [tokenize(httpx, url, headers, q) for q in ("\nQ: Who speaks first?\nA:", "\nQ: Where are we?\nA:")]
    if len(tokens) < 2 * args.prefix_tokens:
        raise NanoseekError("the corpus excerpt is too short for --prefix-tokens")
    before = scrape_prefix_counters(httpx, url, headers)
    miss, hit = [], []
    rng = random.Random(0)
    with httpx.Client(headers=headers, timeout=300) as http:  # one kept-alive connection, as an SDK keeps
        time_to_first_token(http, url, model["id"], questions[0])  # opens it: not timed
        for _ in range(args.ttft_rounds):
            at = rng.randrange(0, len(tokens) - args.prefix_tokens)
            system = tokens[at : at + args.prefix_tokens]
            miss.append(time_to_first_token(http, url, model["id"], system + questions[0]))
            hit.append(time_to_first_token(http, url, model["id"], system + questions[1]))
    after = scrape_prefix_counters(httpx, url, headers)
    hits, queries = (after[i] - before[i] for i in range(2))
    miss_ms, hit_ms = statistics.median(miss) * 1000, statistics.median(hit) * 1000
    return {
        "bench": "serve-prefix-ttft",
        "impl": "nanoseek",
        "prefix_tokens": args.prefix_tokens,
        "rounds": args.ttft_rounds,
        "ttft_miss_ms_p50": round(miss_ms, 2),
        "ttft_hit_ms_p50": round(hit_ms, 2),
        "miss_over_hit": round(miss_ms / hit_ms, 2),
        "ttft_miss_ms_min": round(min(miss) * 1000, 2),
        "ttft_hit_ms_min": round(min(hit) * 1000, 2),
        "prefix_cache_hit_tokens": int(hits),
        "prefix_cache_hit_rate": round(hits / queries, 3) if queries else None,
        "machine": _machine(args.threads),
    }


def tokenize(httpx, url: str, headers: dict, text: str) -> list[int]:
    r = httpx.post(url + "/tokenize", json={"prompt": text}, headers=headers, timeout=60)
    if r.status_code != 200:
        raise NanoseekError(f"/tokenize answered {r.status_code}: {r.text[:200]}")
    return r.json()["tokens"]


def time_to_first_token(http, url: str, model: str, prompt: list[int]) -> float:
    """Seconds from sending a streaming request (one new token, greedy) on the client `http` (an
    httpx.Client, its connection open) to its first chunk with a choice."""
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True}
    sent = time.perf_counter()
    with http.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            raise NanoseekError(f"the TTFT request got HTTP {r.status_code}: {r.text[:200]}")
        first = None
        for line in r.iter_lines():  # to the stream's end
            if first is None and line.startswith("data: {") and json.loads(line[6:]).get("choices"):
                first = time.perf_counter() - sent
    if first is None:
        raise NanoseekError("the TTFT request's stream held no choice")
    return first


def scrape_prefix_counters(httpx, url: str, headers: dict) -> tuple[float, float]:
    """(hit tokens, queried tokens) of the server's prefix cache; zeros when it has none or no /metrics."""
    r = httpx.get(url + "/metrics", headers=headers, timeout=30)
    values = {"nanoseek_prefix_cache_hits_total": 0.0, "nanoseek_prefix_cache_queries_total": 0.0}
    if r.status_code == 200:
        for line in r.text.splitlines():
            name, _, value = line.partition(" ")
            if name in values:
                values[name] = float(value)
    return values["nanoseek_prefix_cache_hits_total"], values["nanoseek_prefix_cache_queries_total"]


def _machine(threads: int) -> dict:
    import torch

    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "server_threads": threads or max(1, (os.cpu_count() or 2) - 1),
        "torch": torch.__version__,
    }
