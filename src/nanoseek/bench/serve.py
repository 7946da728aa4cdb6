"""`nanoseek bench serve`: concurrent streaming clients against a real server on loopback.

For each client count c (default 1, 4, 16), c clients each loop for `seconds`: send a streaming
/v1/completions request (max_tokens new tokens, temperature 0.8, a fixed prompt, the usage chunk
on), read it to `[DONE]`, send the next. Measured per level:

    requests_per_s, tokens_per_s   finished requests and output tokens (from `usage`) per second
    ttft_p50_ms / ttft_p99_ms      request sent -> first text chunk
    itl_p50_ms / itl_p99_ms        gaps between consecutive text chunks of one stream
    errors                         non-200 answers, broken streams and client exceptions
    server_rss_mib_before/after    the server process's resident memory around the level

The server is started here (`nanoseek serve CKPT`, `--max-batch` rows) unless `--url` points at a
running one. The clients share the machine with the server: on 2 cores the client loop costs the
server some CPU, alike at every level. A last line gives the aggregate tokens/s of the largest
client count over one client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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


def random_checkpoint(preset: str, folder: Path) -> Path:
    """A randomly initialized `preset` with the bundled corpus's character tokenizer (speed only)."""
    import torch

    corpus = BUNDLED_CORPUS
    tok = CharTokenizer.train([corpus.read_text()])
    torch.manual_seed(0)
    Transformer(ModelConfig.from_preset(preset).replace(vocab_size=tok.vocab_size)).save_pretrained(folder)
    tok.save(folder)
    return folder


class ServerProcess:
    def __init__(self, ckpt: Path, max_batch: int, threads: int):
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
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.pid = self.proc.pid

    def wait_ready(self, httpx) -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise NanoseekError(f"the server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.25)
        raise NanoseekError("the server did not answer /health within 120 s")

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


def run_serve(args: argparse.Namespace) -> list[dict]:
    try:
        import httpx
    except ImportError:
        raise NanoseekError("bench serve needs httpx (pip install 'nanoseek[serve]')") from None
    try:
        levels = [int(c) for c in args.clients.split(",")]
    except ValueError:
        raise NanoseekError(f"--clients={args.clients!r} must be comma-separated integers like 1,4,16") from None
    if not levels or min(levels) < 1 or args.seconds <= 0 or args.max_tokens < 1:
        raise NanoseekError("--clients must be >= 1 each, --seconds > 0 and --max-tokens >= 1")
    server, tmp, pid, url = None, None, args.server_pid, args.url
    if url is None:
        ckpt = Path(args.ckpt) if args.ckpt else None
        if ckpt is None:
            tmp = tempfile.TemporaryDirectory(prefix="nanoseek-bench-serve-")
            ckpt = random_checkpoint(args.preset, Path(tmp.name) / "model")
        server = ServerProcess(ckpt, args.max_batch, args.threads)
        server.wait_ready(httpx)
        url, pid = server.url, server.pid
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
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
                    "impl": "nanoseek",
                    "clients": clients,
                    "seconds": args.seconds,
                    "max_tokens": args.max_tokens,
                    **figures,
                    "server_rss_mib_before": before,
                    "server_rss_mib_after": process_rss_mib(pid),
                    "machine": _machine(args.threads),
                }
            )
        one = next((r for r in results if r["clients"] == 1), None)
        top = max(results, key=lambda r: r["clients"])
        if one and top is not one and one["tokens_per_s"]:
            results.append(
                {
                    "bench": "serve",
                    "impl": "ratio",
                    f"tokens_per_s_{top['clients']}_over_1": round(top["tokens_per_s"] / one["tokens_per_s"], 2),
                }
            )
        return results
    finally:
        if server:
            server.stop()
        if tmp:
            tmp.cleanup()


def _machine(threads: int) -> dict:
    import torch

    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "server_threads": threads or max(1, (os.cpu_count() or 2) - 1),
        "torch": torch.__version__,
    }
