"""Where the work runs: choosing the compute device, and what changes with it.

    resolve_device("auto")     -> cuda:LOCAL_RANK when torch sees a CUDA GPU, else cpu
    resolve_device("cuda:1")   -> that GPU, checked to exist
    autocast(device, "bfloat16") -> torch.autocast on that device type (bf16 matmuls, fp32 weights)
    bf16_support(device)       -> whether bf16 matmuls run natively here, and the dtype to train in
    synchronize(device)        -> wait for queued GPU kernels, so a wall-clock timer sees them
    peak_memory(device)        -> bytes the CUDA caching allocator held at most (None on CPU);
                                  DevicePeak(device): the same over a `with` block, above its start
    machine(threads)           -> {"cpu", "threads", "torch", "python"[, "gpu"]}: what a result ran on

Everything else is device-agnostic: the model builds its temporaries on its inputs' device, the
trainer moves the model and every batch with `.to(device)`, checkpoints are written from host
copies (safetensors) and load onto whatever device the model is on.
"""

from __future__ import annotations

import platform
import re
from contextlib import nullcontext

import torch

from nanoseek.errors import NanoseekError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_PATTERN = re.compile(r"auto|cpu|cuda(:(0|[1-9]\d*))?")


def check_device_name(where: str, name: str) -> None:
    """A clear error for a device string that is none of DEVICE_CHOICES (availability is checked later)."""
    if not isinstance(name, str) or not _PATTERN.fullmatch(name):
        raise NanoseekError(f"{where}={name!r} is not a device; choose {DEVICE_CHOICES}")


def add_device_arg(parser, default: str = "auto") -> None:
    """The `--device` option of a command (argparse)."""
    parser.add_argument(
        "--device",
        default=default,
        help=f"{DEVICE_CHOICES} (default {default}; auto: a CUDA GPU if torch sees one, else cpu)",
    )


def resolve_device(name: str = "auto", local_rank: int = 0, where: str = "device") -> torch.device:
    """The torch.device for `name`; "auto" is this rank's GPU when CUDA is available, else the CPU.
    Without an index, local rank r takes GPU r (one GPU per process, as NCCL requires)."""
    check_device_name(where, name)
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        name = "cuda"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise NanoseekError(
                f"{where}={name!r} but this torch sees no CUDA GPU (torch {torch.__version__}); use cpu or auto"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise NanoseekError(
                f"{where}={name!r} but only {count} CUDA GPU(s) are visible: "
                f"choose cuda:0 ... cuda:{count - 1}, cuda, auto or cpu"
            )
        index = device.index if device.index is not None else local_rank  # one GPU per local rank
        if index >= count:
            raise NanoseekError(
                f"{where}={name!r} needs GPU {index} (local rank {local_rank}) but only {count} "
                f"CUDA GPU(s) are visible: start at most {count} processes per machine, or use cpu"
            )
        device = torch.device("cuda", index)
    return device


def autocast(device: torch.device | str, dtype: str):
    """bf16 autocast on the device's type for dtype "bfloat16"; no-op for "float32"."""
    if dtype == "bfloat16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 dot products


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def bf16_support(device: torch.device | str = "cpu", flags: set[str] | None = None) -> dict:
    """{"bf16_native": bool, "bf16_evidence": why, "recommended_dtype": "bfloat16" | "float32"}.

    CPU: native with AMX-BF16 or AVX512-BF16 (oneDNN's bf16 GEMMs); without them bf16 matmuls are
    emulated and far slower than fp32, so fp32 is the better choice. CUDA: torch.cuda.is_bf16_supported
    without emulation (compute capability 8.0+)."""
    device = torch.device(device)
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        major, minor = torch.cuda.get_device_capability(device)
        evidence = f"compute capability {major}.{minor}"
    elif device.type == "mps":
        native, evidence = False, "mps"
    else:
        have = sorted((cpu_flags() if flags is None else flags) & set(CPU_BF16_FLAGS))
        native = bool(have)
        capability = torch.backends.cpu.get_cpu_capability()
        evidence = f"cpu flags {', '.join(have)}" if have else f"no amx_bf16/avx512_bf16 (torch cpu: {capability})"
    return {"bf16_native": native, "bf16_evidence": evidence, "recommended_dtype": "bfloat16" if native else "float32"}


def synchronize(device: torch.device | str) -> None:
    """Block until the device has finished its queued work (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device | str) -> int | None:
    """The most bytes the CUDA allocator had allocated since the last reset; None on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return None


class DevicePeak:
    """`with DevicePeak(device) as window:` ... `window.peak`: the most bytes the CUDA allocator held
    inside the block above what it held on entry (None on a CPU, where RSS is the measure)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.peak: int | None = None
        self._base: int | None = None

    def __enter__(self) -> DevicePeak:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> bool:
        if self._base is not None:
            self.peak = peak_memory(self.device) - self._base
        return False


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads: int = 0) -> dict:
    """What a measurement ran on: CPU model, torch threads (`threads`, 0 = torch's default now),
    torch and Python versions, and the GPU when torch sees one."""
    record = {
        "cpu": cpu_name(),
        "threads": threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        record["gpu"] = torch.cuda.get_device_name(0)
    return record
