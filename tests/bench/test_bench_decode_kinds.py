"""`nanoseek bench decode-kinds`: rows per attention kind, cache bytes against the estimate, the bench's
token loop against an uncached forward, bad input."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoseek import bench
from nanoseek.bench import decode_kinds
from nanoseek.bench.decode_kinds import KINDS, add_decode_kinds_args, build_model, run_kind

# windows and top-k below the tiny context, so every sparse kind is sparse at 64 tokens
TINY = ["--window", "16", "--v4-window", "8", "--topk", "8", "--csa-topk", "4", "--threads", "1"]


def rows_of(argv, capsys) -> list[dict]:
    assert bench.run_bench(["decode-kinds", *argv, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_every_kind_gives_a_sane_row_and_the_plot(capsys, tmp_path):
    png = tmp_path / "kinds.png"
    rows = rows_of(["--context", "64", "--new-tokens", "3", *TINY, "--plot", str(png)], capsys)
    assert [r["kind"] for r in rows] == list(KINDS)
    for r in rows:
        assert r["prefill_s"] > 0 and r["prefill_tokens_per_s"] > 0 and r["ms_per_step"] > 0
        assert r["cache_bytes"] == pytest.approx(r["cache_bytes_per_token"] * 67, rel=1e-3)
        # counted from the cache objects, it agrees with the config's estimate (fp32)
        assert r["cache_bytes_per_token"] == pytest.approx(r["formula_bytes_per_token"], rel=0.01)
        assert r["machine"]["threads"] == 1 and "cpu" in r["machine"] and "torch" in r["machine"]
        assert r["step_over_dense"] > 0 and r["prefill_over_dense"] > 0
    by_kind = {r["kind"]: r for r in rows}
    assert by_kind["dense"]["cache_over_dense"] == 1.0
    assert by_kind["sliding"]["cache_over_dense"] == 1.0  # the window bounds the reads, not the cache
    assert by_kind["dsa"]["cache_over_dense"] > 1.0  # the indexer's keys beside the latents
    assert by_kind["v4"]["layers"] == ["csa", "hca", "csa", "hca"]
    assert png.stat().st_size > 0


def test_the_bench_loop_decodes_the_uncached_greedy_tokens():
    """Prefill + cached steps give what a full forward's argmax gives, for a sparse kind (DSA with
    8 keys of 64: its selection is in play)."""
    parser = argparse.ArgumentParser()
    add_decode_kinds_args(parser)
    args = parser.parse_args(TINY + ["--new-tokens", "5"])
    _, tokens = run_kind("dsa", 64, args, machine={})
    model = build_model("dsa", 64 + 5, args)
    prompt = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(torch.cat([prompt[0], tokens[:-1]])[None]).logits[0, 63:].argmax(-1)
    assert len(tokens) == 6  # the prefill's token and one per step
    assert torch.equal(full, tokens)


def test_a_kind_out_of_memory_is_a_row_not_a_crash(capsys, monkeypatch):
    real = decode_kinds.prefill

    def short_of_memory(model, ids, cache):
        if ids.shape[1] == 64 and model.config.sparse == "sliding":
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 8 GB")
        return real(model, ids, cache)

    monkeypatch.setattr(decode_kinds, "prefill", short_of_memory)
    rows = rows_of(["--kinds", "dense,sliding", "--context", "64", "--new-tokens", "2", *TINY], capsys)
    assert "error" not in rows[0] and rows[1]["error"].startswith("out of memory")
    assert "ms_per_step" not in rows[1]


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--kinds", "dense,flash"], "--kinds: unknown kind 'flash'"),
        (["--context", "1k"], "--context='1k' must be comma-separated integers"),
        (["--context", "0"], "positive"),
        (["--new-tokens", "0"], "--new-tokens=0 must be positive"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, field, capsys):
    assert bench.main(["decode-kinds", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert field in err and len(err.splitlines()) == 1


@pytest.mark.slow  # a fresh interpreter: as the other scripts' test in test_bench.py
def test_the_script_in_benchmarks_is_the_same_command():
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_decode_kinds.py"
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "nanoseek bench decode-kinds" in done.stdout
