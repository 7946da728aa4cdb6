"""How long a big /v1/embeddings request stalls a concurrent stream.

    python benchmarks/embed_stall.py [--preset deepseek-v3-mini] [--inputs 2048] [--chars 400]

Starts `nanoseek serve` on a random `--preset` model (the bundled corpus's character tokenizer),
starts one greedy streaming completion, and while it runs sends one embeddings request of `--inputs`
texts of `--chars` characters each (2048 x 400: about 0.9 MB, under the default 1 MiB body limit).
Prints one JSON object: the embeddings request's seconds, the stream's median gap between text
chunks before the request, and its longest gap while the request ran.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from nanoseek.bench.serve import ServerProcess, random_checkpoint


def stream_gaps(url: str, max_tokens: int, arrivals: list[float]) -> None:
    body = {"model": "bench", "prompt": "ROMEO:", "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.perf_counter())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="deepseek-v3-mini")
    p.add_argument("--inputs", type=int, default=2048)
    p.add_argument("--chars", type=int, default=400)
    p.add_argument("--threads", type=int, default=0, help="server torch threads (default: its own)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(random_checkpoint(args.preset, Path(tmp) / "bench"), max_batch=4, threads=args.threads)
        try:
            server.wait_ready(httpx)
            context = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["context_length"]
            arrivals: list[float] = []
            stream = threading.Thread(target=stream_gaps, args=(server.url, context - 8, arrivals))
            stream.start()
            while len(arrivals) < 20 and stream.is_alive():
                time.sleep(0.01)
            before = [b - a for a, b in zip(arrivals, arrivals[1:])]
            texts = [("To be or not to be " * (args.chars // 19 + 1))[: args.chars]] * args.inputs
            start = time.perf_counter()
            r = httpx.post(server.url + "/v1/embeddings", json={"model": "bench", "input": texts}, timeout=600)
            end = time.perf_counter()
            stream.join()
            during = [b - a for a, b in zip(arrivals, arrivals[1:]) if b > start and a < end]
            print(
                json.dumps(
                    {
                        "preset": args.preset,
                        "inputs": args.inputs,
                        "chars": args.chars,
                        "status": r.status_code,
                        "embeddings_s": round(end - start, 3),
                        "stream_gap_median_before_ms": round(1000 * statistics.median(before), 1) if before else None,
                        "stream_gap_max_during_ms": round(1000 * max(during), 1) if during else None,
                        "stream_chunks_during": len(during),
                    }
                )
            )
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
