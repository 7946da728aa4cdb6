"""Training loop, checkpoints and exact resume (tiny model, tiny corpus, fp32, one thread)."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from run_configs import tiny_cfg

from nanoseek import ModelConfig, Transformer, load_model
from nanoseek.cli import main as cli_main
from nanoseek.config import ScheduleConfig, build_train_config
from nanoseek.errors import NanoseekError
from nanoseek.io import checkpoint as ckpt_io
from nanoseek.train import loop
from nanoseek.train.optim import lr_multiplier, parameter_groups


def losses(out) -> list:
    return [r["loss"] for r in map(json.loads, Path(out, "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_run_writes_metrics_plot_and_checkpoint(small_corpus, tmp_path):
    summary = loop.train(tiny_cfg(small_corpus, tmp_path, **{"log.plot": True, "eval.every": 6}), quiet=True)
    assert summary["step"] == 12 and summary["stopped_by"] == "max_steps"
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(records[0])
    assert any("val_loss" in r for r in records)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert ckpt_io.resolve_checkpoint(tmp_path).name == "step-0000012"
    assert losses(tmp_path)[-1] < losses(tmp_path)[0]


def test_resume_after_interrupt_is_bitwise_identical(small_corpus, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    loop.train(tiny_cfg(small_corpus, full), quiet=True)
    first = loop.train(tiny_cfg(small_corpus, part), quiet=True, stop_after=5)  # "Ctrl-C" during step 5
    assert first["stopped_by"] == "interrupt" and first["step"] == 5
    loop.train(tiny_cfg(small_corpus, part), resume=True, quiet=True)
    assert losses(part) == losses(full)  # exact float equality, every step
    a, b = load_model(full), load_model(part)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_kill_9_after_a_checkpoint_then_resume_matches(small_corpus, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    loop.train(tiny_cfg(small_corpus, full, **{"train.max_steps": 30}), quiet=True)
    args = [
        sys.executable,
        "-m",
        "nanoseek",
        "train",
        "--preset",
        "gpt2-tiny",
        "--data",
        small_corpus,
        "--out",
        str(killed),
        "--max-steps",
        "30",
        "--data.seq_len=32",
        "--train.batch_size=4",
        "--train.threads=1",
        "--eval.every=0",
        "--eval.batches=2",
        "--eval.batch_size=4",
        "--checkpoint.every=6",
        "--checkpoint.keep_last=5",
        "--log.every=1",
        "--log.progress=false",
        "--log.plot=false",
        "--schedule.warmup_steps=3",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "LATEST").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "LATEST").exists()
    assert cli_main(args[3:] + ["--resume"]) == 0
    assert losses(killed) == losses(full)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(small_corpus, tmp_path):
    args = [
        sys.executable,
        "-m",
        "nanoseek",
        "train",
        "--preset",
        "gpt2-tiny",
        "--data",
        small_corpus,
        "--out",
        str(tmp_path),
        "--max-steps",
        "100000",
        "--data.seq_len=32",
        "--train.batch_size=2",
        "--train.threads=1",
        "--eval.every=0",
        "--checkpoint.every=0",
        "--log.every=1",
        "--log.progress=false",
        "--log.plot=false",
        "--json",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    summary = json.loads(out.decode().strip().splitlines()[-1])
    assert summary["stopped_by"] == "interrupt"
    assert ckpt_io.resolve_checkpoint(tmp_path).name == f"step-{summary['step']:07d}"
    assert b"--resume" in err


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(small_corpus, tmp_path, monkeypatch):
    build = loop.build_model

    def poisoned(cfg, vocab):
        model = build(cfg, vocab)
        calls = {"n": 0}
        original = model.forward

        def forward(*a, **k):
            out = original(*a, **k)
            calls["n"] += 1
            if calls["n"] > 8 and model.training:
                out.loss = out.loss * float("nan")
            return out

        model.forward = forward
        return model

    monkeypatch.setattr(loop, "build_model", poisoned)
    with pytest.raises(loop.TrainingDiverged, match="step 9"):
        loop.train(tiny_cfg(small_corpus, tmp_path), quiet=True)
    assert ckpt_io.resolve_checkpoint(tmp_path).name == "step-0000006"
    assert all(torch.isfinite(p).all() for p in load_model(tmp_path).parameters())


def test_interrupted_save_leaves_the_previous_checkpoint(small_corpus, tmp_path, monkeypatch):
    loop.train(tiny_cfg(small_corpus, tmp_path, **{"train.max_steps": 6}), quiet=True)
    before = (tmp_path / "LATEST").read_text()
    model = load_model(tmp_path)

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_io, "save_file", broken)
    with pytest.raises(OSError):
        ckpt_io.save_checkpoint(tmp_path, 7, model, tokenizer_json="{}")
    assert (tmp_path / "LATEST").read_text() == before
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000006"]
    load_model(tmp_path)


def test_corrupt_or_truncated_checkpoint_is_a_clear_error(small_corpus, tmp_path, capsys):
    loop.train(tiny_cfg(small_corpus, tmp_path, **{"train.max_steps": 2}), quiet=True)
    weights = ckpt_io.resolve_checkpoint(tmp_path) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(NanoseekError, match="model.safetensors"):
        load_model(tmp_path)
    assert cli_main(["sample", str(tmp_path), "--prompt", "a"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.safetensors" in err and "Traceback" not in err


def test_eval_and_info_commands(small_corpus, tmp_path, capsys):
    loop.train(tiny_cfg(small_corpus, tmp_path, **{"train.max_steps": 2}), quiet=True)
    capsys.readouterr()
    assert cli_main(["eval", str(tmp_path), "--max-batches", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"loss", "perplexity", "tokens", "bits_per_byte"} <= set(result)
    assert result["perplexity"] == pytest.approx(2.718281828 ** result["loss"], rel=1e-6)
    assert cli_main(["info", "--preset", "gpt2-mini", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"params_total", "params_active", "kv_cache_bytes_per_token", "flops_per_token"} <= set(info)


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--preset", "nope"],
        ["train", "--optim.lr=abc"],
        ["train", "--bogus"],
        ["train", "--data", "/does/not/exist"],
        ["sample", "/does/not/exist"],
        ["eval", "/does/not/exist"],
        ["train", "--optim.lr", "1e-3"],
    ],
)
def test_bad_cli_input_exits_2_with_one_line(argv, capsys, tmp_path):
    assert cli_main(argv + ["--out", str(tmp_path)] if argv[0] == "train" else argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("nanoseek: error:") and err.count("\n") == 1


def test_schedules():
    cos = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(cos, 0, 0.0) == pytest.approx(0.1)
    assert lr_multiplier(cos, 50, 0.5) == pytest.approx(0.55)
    assert lr_multiplier(cos, 99, 1.0) == pytest.approx(0.1)
    wsd = ScheduleConfig(name="wsd", warmup_steps=0, decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_multiplier(wsd, 10, 0.7) == 1.0 and lr_multiplier(wsd, 10, 0.9) == pytest.approx(0.5)
    ms = ScheduleConfig(name="multistep", warmup_steps=0)
    assert [lr_multiplier(ms, 1, p) for p in (0.5, 0.85, 0.95)] == pytest.approx([1, 0.316, 0.316**2])
    inv = ScheduleConfig(name="inverse_sqrt", warmup_steps=100)
    assert lr_multiplier(inv, 99, 0) == pytest.approx(1.0)
    assert lr_multiplier(inv, 399, 0) == pytest.approx(0.5)
    assert lr_multiplier(inv, 49, 0) == pytest.approx(0.5)


def test_no_weight_decay_on_norms_biases_embeddings():
    from nanoseek import ModelConfig, Transformer

    model = Transformer(ModelConfig.from_preset("gpt2-tiny"))
    decay, no_decay = parameter_groups(model, 0.1)
    decayed = {id(p) for p in decay["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert names and all(n.endswith("weight") and "norm" not in n and "embed" not in n for n in names)
    assert id(model.embed_tokens.weight) not in decayed


def test_token_budget_accumulation_and_keep_last(small_corpus, tmp_path):
    cfg = tiny_cfg(
        small_corpus,
        tmp_path,
        **{
            "train.max_steps": 0,
            "train.max_tokens": 4 * 32 * 2 * 5,
            "train.grad_accum": 2,
            "checkpoint.every": 1,
            "checkpoint.keep_last": 2,
        },
    )
    summary = loop.train(cfg, quiet=True)
    assert summary["step"] == 5 and summary["tokens"] == 4 * 32 * 2 * 5
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000004", "step-0000005"]


def test_wall_clock_budget_stops_the_run(small_corpus, tmp_path):
    summary = loop.train(
        tiny_cfg(small_corpus, tmp_path, **{"train.max_steps": 0, "train.max_seconds": 1.0}), quiet=True
    )
    assert summary["stopped_by"] == "max_seconds" and summary["step"] >= 1 and summary["elapsed_s"] >= 1.0
    assert summary["elapsed_s"] <= 1.2 or summary["step"] == 1  # a slow setup leaves room for one step only


def test_a_wall_clock_budget_counts_the_setup_and_evaluations(small_corpus, tmp_path, monkeypatch):
    """Tokenizing that takes 10 s (a clock pushed forward) spends all of a 10 s budget: the run
    stops after its one guaranteed step instead of training 10 s more."""
    clock = {"offset": 0.0}
    real_clock, setup = time.perf_counter, loop.setup_data
    monkeypatch.setattr(loop.time, "perf_counter", lambda: real_clock() + clock["offset"])

    def slow_setup(*args):
        result = setup(*args)
        clock["offset"] += 10.0
        return result

    monkeypatch.setattr(loop, "setup_data", slow_setup)
    cfg = tiny_cfg(small_corpus, tmp_path, **{"train.max_steps": 0, "train.max_seconds": 10.0, "eval.points": 4})
    summary = loop.train(cfg, quiet=True)
    assert summary["step"] == 1 and summary["elapsed_s"] >= 10.0


def test_eval_points_spread_evaluations_over_any_budget(small_corpus, tmp_path):
    loop.train(tiny_cfg(small_corpus, tmp_path, **{"train.max_steps": 20, "eval.points": 5}), quiet=True)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8, 12, 16, 20]  # the last one: the final eval


def test_the_progress_label_counts_steps():
    cfg = build_train_config(preset="gpt2-tiny", overrides={"train.max_steps": 2000})
    assert loop.step_label(cfg, loop.RunState(step=120), 0.06) == "step 120/2000"
    cfg = build_train_config(preset="gpt2-tiny", overrides={"train.max_steps": 0, "train.max_seconds": 60})
    assert loop.step_label(cfg, loop.RunState(step=120), 0.25) == "step 120/~480"  # the total the time implies


def test_bf16_autocast_trains(small_corpus, tmp_path):
    summary = loop.train(
        tiny_cfg(small_corpus, tmp_path, **{"train.dtype": "bfloat16", "train.max_steps": 3}), quiet=True
    )
    assert summary["step"] == 3 and math.isfinite(summary["val_loss"])


@pytest.mark.parametrize("native", [False, True])
def test_auto_dtype_trains_in_bf16_only_where_the_device_has_bf16_matmuls(small_corpus, tmp_path, monkeypatch, native):
    support = {"bf16_native": native, "bf16_evidence": "test", "recommended_dtype": "bfloat16" if native else "float32"}
    monkeypatch.setattr(loop, "bf16_support", lambda device: support)
    cfg = tiny_cfg(small_corpus, tmp_path, **{"train.dtype": "auto", "train.max_steps": 1})
    loop.train(cfg, quiet=True)
    written = json.loads((Path(cfg.out) / "train_config.json").read_text())
    assert written["train"]["dtype"] == support["recommended_dtype"]


def test_moe_training_logs_expert_load(small_corpus, tmp_path):
    cfg = build_train_config(
        preset="deepseek-v3-tiny",
        overrides={
            "data.path": [small_corpus],
            "data.seq_len": 32,
            "train.batch_size": 2,
            "train.max_steps": 3,
            "train.threads": 1,
            "eval.batches": 1,
            "eval.batch_size": 2,
            "log.every": 1,
            "log.progress": False,
            "log.plot": False,
            "out": str(tmp_path),
        },
    )
    loop.train(cfg, quiet=True)
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert (
        rec["moe_max_over_mean"] >= 1.0 and len(rec["moe_load"]) == 2 and len(rec["moe_load"][0]) == 4
    )  # layer 1 + MTP
    assert rec["mtp_loss"] > 0


def test_tokenizer_and_chat_commands(small_corpus, tmp_path, capsys, monkeypatch):
    import io

    assert (
        cli_main(
            ["tokenizer", "train", "--vocab-size", "300", "--out", str(tmp_path / "tok.json"), small_corpus, "--json"]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["vocab_size"] == 300
    loop.train(tiny_cfg(small_corpus, tmp_path / "run", **{"train.max_steps": 2}), quiet=True)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n"))
    assert cli_main(["chat", str(tmp_path / "run"), "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_sample_continues_past_the_context_with_a_sliding_window(small_corpus, tmp_path, capsys):
    loop.train(
        tiny_cfg(small_corpus, tmp_path, **{"train.max_steps": 2, "model.max_position_embeddings": 32}), quiet=True
    )
    capsys.readouterr()
    assert cli_main(["sample", str(tmp_path), "--prompt", "ROMEO:", "--max-new-tokens", "80", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ROMEO:") and len(out.encode()) >= len("ROMEO:") + 80  # char-level: >= 1 byte/token


def test_sample_compile_prefill_runs_the_prompt_through_the_compiled_prefill(
    small_corpus, tmp_path, capsys, monkeypatch
):
    """`nanoseek sample --compile-prefill` reaches generate's compiled prefill (a spy here: the
    compile itself is tested in test_generate); greedy text equals the plain run's."""
    import functools
    import importlib

    gen = importlib.import_module("nanoseek.generation.loop")
    calls = []

    def spy(model):
        calls.append(model)
        return functools.partial(gen.prefill, model)

    loop.train(tiny_cfg(small_corpus, tmp_path, **{"train.max_steps": 2}), quiet=True)
    args = ["sample", str(tmp_path), "--prompt", "ROMEO:", "--max-new-tokens", "12", "--temperature", "0"]
    capsys.readouterr()
    assert cli_main(args) == 0
    plain = capsys.readouterr().out
    monkeypatch.setattr(gen, "compiled_prefill", spy)
    assert cli_main(args + ["--compile-prefill"]) == 0
    assert len(calls) == 1 and capsys.readouterr().out == plain
    assert cli_main(args + ["--speculative", "--compile"]) == 2  # speculative decoding is eager: said, not ignored
    assert "--speculative" in capsys.readouterr().err


def test_chat_compile_flags_reach_the_decoder_and_prefill(small_corpus, tmp_path, capsys, monkeypatch):
    """`nanoseek chat --compile --compile-prefill`: each turn asks for a compiled decoder and runs its
    prompt through the compiled prefill (spies: the compiles are tested in test_generate)."""
    import functools
    import importlib
    import io

    gen = importlib.import_module("nanoseek.generation.loop")
    prefills, decoders = [], []

    def spy_prefill(model):
        prefills.append(model)
        return functools.partial(gen.prefill, model)

    def spy_acquire(cls, model, batch, total):
        decoders.append(batch)
        return None  # as when the decoder is busy: this turn decodes eagerly

    monkeypatch.setattr(gen, "compiled_prefill", spy_prefill)
    monkeypatch.setattr(gen.CompiledDecoder, "acquire", classmethod(spy_acquire))
    loop.train(tiny_cfg(small_corpus, tmp_path / "run", **{"train.max_steps": 2}), quiet=True)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\nAnd again\n"))
    assert (
        cli_main(
            ["chat", str(tmp_path / "run"), "--max-new-tokens", "4", "--seed", "0", "--compile", "--compile-prefill"]
        )
        == 0
    )
    assert len(prefills) == 2 and len(decoders) == 2 and capsys.readouterr().out.strip() != ""


def test_dsa_warmup_then_sparse_training(small_corpus, tmp_path):
    """The first steps train only the indexers (main weights unchanged), then everything trains."""
    cfg = build_train_config(
        preset="deepseek-v32-tiny",
        overrides={
            "data.path": [small_corpus],
            "data.seq_len": 32,
            "train.batch_size": 4,
            "train.max_steps": 4,
            "train.threads": 1,
            "eval.every": 0,
            "eval.batches": 1,
            "eval.batch_size": 4,
            "checkpoint.every": 2,
            "checkpoint.keep_last": 5,
            "log.every": 1,
            "log.progress": False,
            "log.plot": False,
            "train.dsa_warmup_steps": 2,
            "out": str(tmp_path),
        },
    )
    loop.train(cfg, quiet=True)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["index_loss"] >= 0 for r in records if "loss" in r)
    weights = {
        step: ckpt_io.read_safetensors(tmp_path / "checkpoints" / f"step-000000{step}" / ckpt_io.MODEL_FILE)
        for step in (2, 4)
    }
    init = loop.build_model(cfg, cfg.model.vocab_size).state_dict()  # the same seed as the run
    moved = [k for k in weights[2] if not torch.equal(weights[2][k], init[k])]
    assert moved and all(".indexer." in k for k in moved), moved
    assert not torch.equal(weights[4]["embed_tokens.weight"], weights[2]["embed_tokens.weight"])


@pytest.mark.parametrize(
    "preset,dtype",
    [
        ("llama-tiny", torch.float32),
        ("deepseek-v3-tiny", torch.float32),
        ("deepseek-v3-tiny", torch.bfloat16),
        ("deepseek-v32-tiny", torch.float32),
        ("deepseek-v4-tiny", torch.float32),
    ],
)
def test_training_forward_compiles_as_one_graph(preset, dtype):
    """`train.compile=true`: the training forward (head and loss fused, MTP and balance losses, the
    routed experts' grouped matmul: torch's own op in bf16, `nanoseek::grouped_mm` in fp32) is one
    graph, no break (fullgraph=True raises on one); its loss and gradients equal eager's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset(preset)).train()
    x = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    results = []
    for fn in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = fn(x, x, return_logits=False)
            loss = out.loss + sum(v for v in out.aux.values() if v.requires_grad)
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(results[0]) == len(results[1]) > 10
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, **tol)
