"""torchrun with 2 gloo processes: DDP and FSDP2 train exactly like one process with the same global batch,
and checkpoints resume across world sizes."""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(small_corpus, out, preset, batch, steps=20, extra=()):
    if preset == "deepseek-v3-tiny-dense":  # MLA + MTP with dense SwiGLU layers (FSDP refuses MoE)
        preset, extra = "deepseek-v3-tiny", ["--model.ffn=swiglu", *extra]
    return [
        "train",
        "--preset",
        preset,
        "--data",
        small_corpus,
        "--out",
        str(out),
        "--max-steps",
        str(steps),
        "--data.seq_len=32",
        f"--train.batch_size={batch}",
        "--train.threads=1",
        "--eval.every=0",
        "--eval.batches=1",
        "--eval.batch_size=2",
        "--checkpoint.every=10",
        "--checkpoint.keep_last=5",
        "--log.every=1",
        "--log.progress=false",
        "--log.plot=false",
        "--schedule.warmup_steps=5",
        *extra,
    ]


def run(args, nproc=1):
    if nproc == 1:
        cmd = [sys.executable, "-m", "nanoseek", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}",
            "-m",
            "nanoseek",
            *args,
        ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(out) -> list:
    return [r["loss"] for r in map(json.loads, Path(out, "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def close(a, b, tol=1e-5):
    assert len(a) == len(b)
    assert max(abs(x - y) for x, y in zip(a, b)) <= tol, list(zip(a, b))


def strategy_flags(strategy: str) -> list[str]:
    if strategy == "ddp+ep":  # expert parallelism: the routed experts split over the 2 ranks
        return ["--dist.strategy=ddp", "--dist.expert_parallel=true"]
    return [f"--dist.strategy={strategy}"]


SLOW = pytest.mark.slow  # the same property as a default case on another architecture: `make test-all`


@pytest.mark.parametrize(
    "strategy, preset",
    [
        pytest.param("ddp", "gpt2-tiny", marks=SLOW),
        pytest.param("fsdp", "llama-tiny", marks=SLOW),
        ("ddp", "deepseek-v3-tiny"),
        pytest.param("fsdp", "deepseek-v3-tiny-dense", marks=SLOW),
        ("ddp+ep", "deepseek-v3-tiny"),
        ("fsdp", "deepseek-v3-tiny"),
    ],
)
def test_two_ranks_equal_one_process_and_resume_across_world_sizes(small_corpus, tmp_path, strategy, preset):
    one, two = tmp_path / "one", tmp_path / "two"
    run(train_args(small_corpus, one, preset, batch=4))
    done = run(train_args(small_corpus, two, preset, batch=2, extra=strategy_flags(strategy)), nproc=2)
    if strategy == "ddp+ep":
        assert "expert parallel: 2 of 4 routed experts per rank" in done.stderr
    close(losses(two), losses(one))
    # resume the 2-rank run's step-10 checkpoint in ONE process: the same losses as the 2-rank run
    shutil.rmtree(two / "checkpoints" / "step-0000020")
    (two / "LATEST").write_text("step-0000010\n")
    run(train_args(small_corpus, two, preset, batch=4, extra=["--resume"]))
    close(losses(two), losses(one))
    # and resume a 1-process checkpoint on 2 ranks
    shutil.rmtree(one / "checkpoints" / "step-0000020")
    (one / "LATEST").write_text("step-0000010\n")
    full = losses(one)
    run(train_args(small_corpus, one, preset, batch=2, extra=["--resume", *strategy_flags(strategy)]), nproc=2)
    close(losses(one), full)


def test_fsdp_activation_checkpointing_is_exact_and_bf16_policy_stays_close(small_corpus, tmp_path):
    one, ckpt, bf16 = tmp_path / "one", tmp_path / "ckpt", tmp_path / "bf16"
    run(train_args(small_corpus, one, "llama-tiny", batch=4, steps=10))
    run(
        train_args(
            small_corpus,
            ckpt,
            "llama-tiny",
            batch=2,
            steps=10,
            extra=["--dist.strategy=fsdp", "--dist.activation_checkpointing=true"],
        ),
        nproc=2,
    )
    close(losses(ckpt), losses(one))
    run(
        train_args(
            small_corpus,
            bf16,
            "llama-tiny",
            batch=2,
            steps=10,
            extra=["--dist.strategy=fsdp", "--dist.mixed_precision=true"],
        ),
        nproc=2,
    )
    close(losses(bf16), losses(one), tol=0.03)  # bf16 compute: close, not equal
    assert losses(bf16) != losses(one)


def test_checkpoint_of_a_sharded_run_loads_in_one_process(small_corpus, tmp_path):
    from nanoseek import load_model

    run(train_args(small_corpus, tmp_path, "gpt2-tiny", batch=2, steps=4, extra=["--dist.strategy=fsdp"]), nproc=2)
    model = load_model(tmp_path)
    assert all(torch.isfinite(p).all() for p in model.parameters())
