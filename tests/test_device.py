"""Choosing the device: names are checked, a missing GPU is a clear error, and the CPU path is
what `auto` gives on a machine without CUDA. (tests/test_gpu.py runs the same code on a GPU.)"""

from __future__ import annotations

import pytest
import torch

import nanoseek.bench.train as bench
from nanoseek.cli import main as cli_main
from nanoseek.config import build_train_config
from nanoseek.device import DevicePeak, autocast, bf16_support, cpu_flags, peak_memory, resolve_device, synchronize
from nanoseek.errors import NanoseekError
from nanoseek.model.moe.experts import matmul_dtype

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "CPU", "mps", "", "cpu\n", "cuda:01", " cuda"])
def test_bad_device_names_list_the_choices(name):
    with pytest.raises(NanoseekError, match="choose auto, cpu, cuda or cuda:N"):
        resolve_device(name, where="train.device")


def test_train_config_checks_the_device_field():
    with pytest.raises(NanoseekError, match="train.device='gpu'"):
        build_train_config(preset="gpt2-tiny", overrides={"train.device": "gpu"})
    assert build_train_config(preset="gpt2-tiny").train.device == "auto"


@no_cuda
def test_auto_is_the_cpu_without_cuda_and_cuda_is_refused():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(NanoseekError, match="sees no CUDA GPU"):
            resolve_device(name, where="--device")


@no_cuda
@pytest.mark.parametrize(
    "argv",
    [
        ["sample", "CKPT", "--device", "cuda"],
        ["bench", "train", "--preset", "gpt2-tiny", "--device", "cuda"],
        ["bench", "decode", "--preset", "llama-tiny", "--device", "cuda:1"],
    ],
)
def test_cli_refuses_a_gpu_it_does_not_have(argv, capsys, tmp_path):
    argv = [str(tmp_path) if a == "CKPT" else a for a in argv]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "sees no CUDA GPU" in err and err.count("\n") == 1


def test_cpu_helpers():
    synchronize("cpu")  # a no-op, not an error
    assert peak_memory("cpu") is None
    with DevicePeak("cpu") as window:
        torch.ones(1 << 20)
    assert window.peak is None  # RSS is the CPU's measure
    with autocast(torch.device("cpu"), "bfloat16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert matmul_dtype(torch.ones(2)) == torch.bfloat16  # the experts' matmuls follow autocast
    with autocast("cpu", "float32"):
        assert not torch.is_autocast_enabled("cpu")
    assert matmul_dtype(torch.ones(2, dtype=torch.float64)) == torch.float64


def test_bench_train_records_its_device():
    rows = bench.bench_train(
        "gpt2-tiny",
        ("nanoseek",),
        seq_len=8,
        batch=2,
        steps=1,
        warmup=0,
        rounds=1,
        threads=1,
        peak_seconds=0.05,
        device="cpu",
    )
    assert rows[0]["device"] == "cpu" and rows[0]["peak_device_mib"] is None
    assert rows[0]["tokens_per_s"] > 0
    assert rows[0]["recommended_dtype"] in ("float32", "bfloat16") and "bf16_native" in rows[0]


def test_bf16_support_reads_the_cpu_flags():
    assert cpu_flags("processor : 0\nflags : fpu avx2 amx_bf16 amx_tile\n") == {"fpu", "avx2", "amx_bf16", "amx_tile"}
    assert bf16_support("cpu", {"avx2", "avx512_bf16"}) == {
        "bf16_native": True,
        "bf16_evidence": "cpu flags avx512_bf16",
        "recommended_dtype": "bfloat16",
    }
    plain = bf16_support("cpu", {"avx2", "fma"})
    assert not plain["bf16_native"] and plain["recommended_dtype"] == "float32"


def test_one_gpu_per_local_rank(monkeypatch):
    """With GPUs (faked here: two visible), local rank r takes GPU r; a rank without a GPU of its
    own, or an index past the visible ones, is an error rather than two ranks on one GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
    assert resolve_device("cuda:1", local_rank=0) == torch.device("cuda", 1)
    assert resolve_device("cpu", local_rank=3) == torch.device("cpu")
    with pytest.raises(NanoseekError, match="local rank 2.*only 2 CUDA GPU"):
        resolve_device("auto", local_rank=2, where="train.device")
    with pytest.raises(NanoseekError, match="'cuda:5' but only 2 CUDA GPU.*choose cuda:0 ... cuda:1"):
        resolve_device("cuda:5")


def test_ranks_may_not_all_name_one_gpu(monkeypatch):
    from nanoseek.parallel import dist

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(NanoseekError, match="train.device='cuda:0' would put every rank on one GPU"):
        dist.init_distributed("ddp", "cuda:0")
    with pytest.raises(NanoseekError, match="local rank 1"):  # and a rank without a GPU of its own
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        dist.init_distributed("ddp", "auto")
