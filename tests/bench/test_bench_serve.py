"""`nanoseek bench serve` at tiny settings: it runs end to end and reports every figure (speed is not
asserted: the machine running the tests is shared)."""

from __future__ import annotations

import json

import pytest

from nanoseek.bench import run_bench
from nanoseek.errors import NanoseekError

for extra in ("httpx", "fastapi", "uvicorn", "prometheus_client"):
    pytest.importorskip(extra)

TINY = ["serve", "--preset", "deepseek-v3-tiny", "--clients", "1,2", "--seconds", "0.5", "--max-tokens", "4"]
TINY += ["--threads", "1", "--ttft-rounds", "2"]


def run_lines(argv, capsys) -> list[dict]:
    assert run_bench([*argv, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_bench_serve_levels_and_prefix_ttft(capsys):
    rows = run_lines([*TINY, "--engines", "eager", "--prefix-tokens", "64"], capsys)
    levels = [r for r in rows if r["bench"] == "serve" and r["impl"] == "nanoseek-eager"]
    assert [r["clients"] for r in levels] == [1, 2]
    assert all(r["errors"] == 0 and r["requests"] > 0 and r["tokens_per_s"] > 0 and r["startup_s"] > 0 for r in levels)
    assert any(r["impl"] == "ratio" and "tokens_per_s_2_over_1" in r for r in rows)
    (ttft,) = [r for r in rows if r["bench"] == "serve-prefix-ttft"]
    assert ttft["prefix_tokens"] == 64 and ttft["ttft_hit_ms_p50"] > 0 and ttft["ttft_miss_ms_p50"] > 0
    assert ttft["prefix_cache_hit_tokens"] == 2 * 64  # each hit request found its 64 shared tokens


@pytest.mark.hf
def test_bench_serve_against_transformers_generate(capsys):
    pytest.importorskip("transformers")
    rows = run_lines([*TINY, "--engines", "eager", "--prefix-tokens", "0", "--peers", "hf"], capsys)
    hf = [r for r in rows if r["impl"] == "hf-generate"]
    assert [r["clients"] for r in hf] == [1, 2] and all(r["tokens_per_s"] > 0 for r in hf)
    assert all("nanoseek-eager_over_hf-generate" in r for r in rows if r["impl"] == "ratio" and "clients" in r)
    assert not any(r["bench"] == "serve-prefix-ttft" for r in rows)


@pytest.mark.slow
def test_bench_serve_compiled_against_eager(capsys):
    rows = run_lines([*TINY, "--clients", "2", "--engines", "compiled,eager", "--prefix-tokens", "0"], capsys)
    (ratio,) = [r for r in rows if r["impl"] == "ratio"]
    assert ratio["nanoseek-compiled_over_nanoseek-eager"] > 0


@pytest.mark.parametrize(
    "args,message",
    [
        (["--engines", "fast"], "--engines"),
        (["--peers", "vllm"], "--peers"),
        (["--prefix-tokens", "-1"], "--prefix-tokens"),
        (["--clients", "1,x"], "--clients"),
    ],
)
def test_bench_serve_refuses_bad_options(args, message):
    with pytest.raises(NanoseekError, match=message):
        run_bench(["serve", *args])


def test_bench_serve_table_has_one_table_per_measurement(capsys):
    assert run_bench([*TINY, "--clients", "1", "--engines", "eager", "--prefix-tokens", "32"]) == 0
    out = capsys.readouterr().out
    assert "ttft_hit_ms_p50" in out and "tokens_per_s" in out
    levels = next(block for block in out.split("\n\n") if "tokens_per_s" in block)
    assert "ttft_hit_ms_p50" not in levels  # the prefix-cache phase has its own table
