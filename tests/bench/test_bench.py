"""`nanoseek bench train`: smoke runs at tiny shapes, and the reference GPT's equivalence."""

import json
import math
import sys
import time

import pytest
import torch

import nanoseek.bench.train as bench
from nanoseek.bench import common, run_bench
from nanoseek.config import ModelConfig
from nanoseek.errors import NanoseekError
from nanoseek.model import Transformer

TINY = dict(seq_len=16, batch=2, steps=2, warmup=1, rounds=2, threads=1, peak_seconds=0.1)


def reference_for(cfg: ModelConfig):
    ref = bench.reference_gpt
    return ref.GPT(
        ref.GPTConfig(
            block_size=cfg.max_position_embeddings,
            vocab_size=cfg.vocab_size,
            n_layer=cfg.num_hidden_layers,
            n_head=cfg.num_attention_heads,
            n_embd=cfg.hidden_size,
            dropout=0.0,
            bias=True,
        )
    )


def test_heap_in_use_sees_a_live_tensor():
    before = common.heap_in_use()
    if before is None:
        pytest.skip("no glibc mallinfo2 here")
    x = torch.ones(16 << 20, dtype=torch.uint8)  # 16 MiB, touched
    assert common.heap_in_use() - before >= 15 << 20
    del x
    assert common.heap_in_use() - before < 4 << 20


def test_rss_sampler_without_heap_never_walks_the_heap(monkeypatch):
    """The attention bench's sampler: RSS only (a heap sample walks glibc's lists under its lock)."""
    walked = []
    monkeypatch.setattr(common, "heap_in_use", lambda: walked.append(1) or 0)
    base = common.current_rss()
    with common.RssSampler(interval=0.001, heap=False) as rss:
        x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, fresh pages, touched
        time.sleep(0.05)
    del x
    assert rss.heap_peak is None and not walked
    assert rss.peak - base >= 60 << 20  # RSS is still sampled
    with common.RssSampler(interval=0.001) as rss:
        time.sleep(0.02)
    assert walked  # with the heap (the default), it is sampled


@pytest.mark.parametrize("kernel_mark", [True, False])
def test_peak_rss_sees_a_tensor_freed_before_the_end(monkeypatch, kernel_mark):
    """The attention bench's peak: Linux's reset high-water mark, or (where it cannot be reset) the
    sampler; either way a 64 MiB tensor freed before the block ends is counted, and a second block
    starts from its own baseline."""
    if kernel_mark and not common.reset_peak_rss():
        pytest.skip("no resettable VmHWM here")
    if not kernel_mark:
        monkeypatch.setattr(common, "reset_peak_rss", lambda: False)
    with common.PeakRss() as peak:
        x = torch.ones(64 << 20, dtype=torch.uint8)  # fresh pages, touched
        time.sleep(0.02)
        del x
    assert peak.growth >= 60 << 20
    with common.PeakRss() as quiet:
        time.sleep(0.01)
    assert quiet.growth < 16 << 20


def test_bench_train_smoke():
    results = bench.bench_train("gpt2-tiny", **TINY)
    by_impl = {r["impl"]: r for r in results}
    assert [r["impl"] for r in results] == ["nanoseek", "reference", "ratio"]
    for impl in ("nanoseek", "reference"):
        r = by_impl[impl]
        assert r["bench"] == "train" and r["preset"] == "gpt2-tiny" and r["dtype"] == "float32"
        assert r["seq_len"] == 16 and r["batch"] == 2 and r["threads"] == 1
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
        assert r["seconds"] > 0 and len(r["tokens_per_s_rounds"]) == 2
        assert math.isfinite(r["loss"]) and 0 < r["loss"] < 6
        assert r["mfu"] is not None and 0 < r["mfu"] < 10
        assert r["peak_rss_mib"] >= 0
        assert r["peak_heap_mib"] is None or r["peak_heap_mib"] > 0  # the model's weights at least
        assert isinstance(r["torch"], str) and isinstance(r["cpu"], str)
        json.dumps(r)
    # identical shapes: the same FLOPs per token for both
    assert by_impl["nanoseek"]["flops_per_token"] == by_impl["reference"]["flops_per_token"]
    ratio = by_impl["ratio"]["nanoseek_over_reference"]
    assert math.isfinite(ratio) and ratio > 0
    assert torch.get_num_threads() == 1  # restored


@pytest.mark.parametrize("preset", ["gpt2-tiny", "gpt2-mini"])
def test_reference_has_nanoseeks_parameters(preset):
    cfg = ModelConfig.from_preset(preset).replace(vocab_size=65, max_position_embeddings=16)
    model, ref = Transformer(cfg), reference_for(cfg)
    ref_total = sum(p.numel() for p in ref.parameters())  # parameters() skips the tied duplicate
    assert model.num_params()["total"] == ref_total
    assert sorted(p.shape for p in model.parameters()) == sorted(p.shape for p in ref.parameters())
    # nanoGPT's estimate_mfu: 6 N + 12 L C T with N excluding the position table
    expected = 6 * ref.get_num_params() + 12 * cfg.num_hidden_layers * cfg.hidden_size * 16
    assert model.flops_per_token(16) == expected


def test_reference_learns_a_repeated_batch():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("gpt2-tiny").replace(vocab_size=65, max_position_embeddings=16)
    model = reference_for(cfg)
    opt = model.configure_optimizers(weight_decay=0.1, lr=1e-3, betas=(0.9, 0.95))
    x = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, dims=1)
    losses = []
    for _ in range(20):
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0  # ~4.2 -> ~2.2
    # decay on 2-D tensors only
    decay, no_decay = opt.param_groups
    assert all(p.dim() == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0


def test_run_bench_prints_json_lines(capsys):
    code = run_bench(
        [
            "train",
            "--preset",
            "gpt2-tiny",
            "--seq-len",
            "8",
            "--batch",
            "1",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--rounds",
            "1",
            "--threads",
            "1",
            "--peers",
            "none",
            "--peak-seconds",
            "0.05",
            "--data",
            "random",
            "--json",
        ]
    )
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["impl"] for r in lines] == ["nanoseek"]
    assert lines[0]["data"] == "random" and lines[0]["tokens_per_s"] > 0


def test_bench_train_fp32_peer_is_nanoseek_in_float32_beside_bf16(capsys):
    args = ["train", "--preset", "gpt2-tiny", "--seq-len", "8", "--batch", "1", "--steps", "1", "--warmup", "0"]
    args += ["--rounds", "1", "--threads", "1", "--peak-seconds", "0.05", "--data", "random", "--json"]
    assert run_bench([*args, "--peers", "fp32", "--dtype", "bfloat16"]) == 0
    rows = {r["impl"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert (rows["nanoseek"]["dtype"], rows["nanoseek-fp32"]["dtype"]) == ("bfloat16", "float32")
    ratio = rows["nanoseek"]["tokens_per_s"] / rows["nanoseek-fp32"]["tokens_per_s"]
    assert rows["ratio"]["nanoseek_over_nanoseek-fp32"] == pytest.approx(ratio)
    with pytest.raises(NanoseekError, match="choose from reference, hf, fp32, none"):
        run_bench([*args, "--peers", "fp64"])


def test_bench_results_are_a_table_for_people():
    from nanoseek.bench.report import results_table

    shared = {"bench": "train", "preset": "gpt2-mini", "cpu": "EPYC", "threads": 2}
    rows = [
        {**shared, "impl": "nanoseek", "tokens_per_s": 15263.4},
        {**shared, "impl": "reference", "tokens_per_s": 14536.0},
        {**shared, "impl": "ratio", "nanoseek_over_reference": 1.05},
    ]
    text = results_table(rows)
    assert text.count("EPYC") == 1  # the machine once, not on every line
    assert "preset: gpt2-mini" in text and "15,263" in text and "1.05" in text
    assert text.splitlines()[3].split() == ["impl", "tokens_per_s"]


def test_unknown_benchmark_lists_choices():
    with pytest.raises(NanoseekError, match="choose one of: train"):
        run_bench(["nonsense"])


def test_reference_needs_a_gpt2_preset():
    with pytest.raises(NanoseekError, match="not GPT-2-shaped"):
        bench.bench_train("llama-tiny", **TINY)


def test_bad_arguments():
    with pytest.raises(NanoseekError, match="dtype"):
        bench.bench_train("gpt2-tiny", dtype="float16")
    with pytest.raises(NanoseekError, match="steps"):
        bench.bench_train("gpt2-tiny", steps=0)
    with pytest.raises(NanoseekError, match="unknown implementation"):
        bench.bench_train("gpt2-tiny", impls=("jax",))


def test_matmul_peak_is_positive():
    assert common.measure_matmul_peak("float32", threads=1, seconds=0.05) > 0


def run_lines(argv, capsys) -> list[dict]:
    assert run_bench([*argv, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


@pytest.mark.hf
def test_bench_prefill_and_decode_against_transformers(capsys):
    pytest.importorskip("transformers")
    rows = run_lines(
        ["prefill", "--preset", "deepseek-v3-tiny", "--rounds", "1", "--prompt-len", "16", "--threads", "1"], capsys
    )
    assert [r["impl"] for r in rows] == ["nanoseek", "hf", "ratio"]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] for r in rows[:2])
    rows = run_lines(
        [
            "decode",
            "--preset",
            "deepseek-v3-tiny",
            "--rounds",
            "1",
            "--batch",
            "1,2",
            "--context",
            "8",
            "--new-tokens",
            "4",
            "--threads",
            "1",
        ],
        capsys,
    )
    decode = [r for r in rows if r["impl"] != "ratio"]
    assert {(r["impl"], r["batch"]) for r in decode} == {("nanoseek", 1), ("hf", 1), ("nanoseek", 2), ("hf", 2)}
    assert all(r["tokens_per_s"] > 0 and r["bandwidth_fraction"] > 0 for r in decode)
    assert sum(r["impl"] == "ratio" for r in rows) == 2


def test_bench_attention_smoke(capsys):
    rows = run_lines(
        [
            "attention",
            "--seq",
            "256",
            "--kinds",
            "dense,sliding,nsa,dsa",
            "--window",
            "64",
            "--topk",
            "32",
            "--repeats",
            "1",
            "--heads",
            "2",
            "--head-dim",
            "16",
            "--model-dim",
            "24",
            "--threads",
            "1",
        ],
        capsys,
    )
    assert [r["kind"] for r in rows] == ["dense", "sliding", "nsa", "dsa"]
    assert all(r["model_dim"] == 24 for r in rows)
    assert all(r["forward_s"] > 0 and r["backward_s"] > 0 for r in rows)
    assert all("forward_over_dense" in r for r in rows[1:])


def test_bench_attention_warmup_runs_untimed_calls_first(capsys, monkeypatch):
    import nanoseek.bench.attention as attention

    calls = []
    real = attention.run_kind
    monkeypatch.setattr(attention, "run_kind", lambda kind, *a, **kw: calls.append(kind) or real(kind, *a, **kw))
    args = ["attention", "--seq", "64", "--kinds", "dense", "--heads", "2", "--head-dim", "16", "--threads", "1"]
    rows = run_lines([*args, "--repeats", "2", "--warmup", "3", "--no-flops"], capsys)
    assert len(calls) == 5 and rows[0]["forward_s"] is not None
    calls.clear()
    run_lines([*args, "--repeats", "2", "--no-flops"], capsys)
    assert len(calls) == 2  # no warm-up on the CPU by default


@pytest.mark.parametrize("kind", ["train", "prefill", "decode", "attention", "serve"])
def test_every_bench_runs_as_a_script_in_benchmarks(kind):
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / f"bench_{kind}.py"
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"nanoseek bench {kind}" in done.stdout  # argparse's prog: the same command


def test_attention_script_prints_json_lines():
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_attention.py"
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            "--seq",
            "64",
            "--kinds",
            "dense,sliding",
            "--window",
            "16",
            "--repeats",
            "1",
            "--heads",
            "2",
            "--head-dim",
            "16",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["kind"] for line in done.stdout.splitlines()] == ["dense", "sliding"]


@pytest.mark.hf
def test_bench_train_against_transformers_same_weights_same_loss():
    pytest.importorskip("transformers")
    results = bench.bench_train(
        "deepseek-v3-tiny",
        ("nanoseek", "hf"),
        seq_len=16,
        batch=2,
        steps=2,
        warmup=1,
        rounds=1,
        threads=1,
        peak_seconds=0.1,
    )
    by_impl = {r["impl"]: r for r in results}
    assert set(by_impl) == {"nanoseek", "hf", "ratio"}
    # the same initial weights and batches: the two implementations train alike
    assert abs(by_impl["nanoseek"]["loss"] - by_impl["hf"]["loss"]) < 1e-3
    assert by_impl["ratio"]["nanoseek_over_hf"] > 0


def test_bench_attention_prints_a_table_without_json(capsys):
    argv = "attention --seq 64 --kinds dense,sliding --window 16 --repeats 1 --heads 2 --head-dim 16 --threads 1"
    assert run_bench(argv.split()) == 0
    out = capsys.readouterr().out
    assert "sliding" in out and "forward_over_dense" in out and not out.lstrip().startswith("{")
