"""What the benchmarks measure of the machine: CPU name, resident memory and C heap, threads,
the attainable matmul rate (the MFU denominator) and the device record of a result."""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time

import torch

from nanoseek.device import cpu_name, synchronize

__all__ = ["cpu_name"]  # the machine record's CPU name, from nanoseek.device

MIB = 1 << 20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def current_rss() -> int:
    """Anonymous resident memory of this process now, in bytes (0 where /proc is missing).

    /proc/self/statm's resident minus shared pages: heap and tensors, without file-backed pages
    (the parts of libtorch's code that a first call happens to map in)."""
    try:
        with open("/proc/self/statm") as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc malloc_trim) so RSS baselines are clean."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _load_mallinfo2():
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _load_mallinfo2()


def heap_in_use() -> int | None:
    """Bytes the C allocator has handed out and not had back (glibc mallinfo2: in-use heap chunks
    plus mmapped blocks), or None without glibc >= 2.33. Unlike RSS it excludes freed memory the
    allocator keeps (fragmentation, trim thresholds): the live tensors' footprint."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd


class RssSampler:
    """Samples the current RSS (and, with `heap`, the C heap in use) in a background thread; `peak` and
    `heap_peak` are the highest values seen (`heap_peak` None without `heap` or where `heap_in_use` is).
    A heap sample walks glibc's free lists under the allocator's lock (~0.5 ms with a fragmented heap:
    a tenth of a pinned core every 5 ms), so timings that need no heap figure leave it off."""

    def __init__(self, interval: float = 0.005, heap: bool = True):
        self.interval, self.heap = interval, heap
        self.peak = 0
        self.heap_base = self.heap_peak = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        self.peak = current_rss()
        self.heap_base = self.heap_peak = heap_in_use() if self.heap else None
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        self.peak = max(self.peak, current_rss())
        if self.heap_peak is not None:
            self.heap_peak = max(self.heap_peak, heap_in_use())

    def _run(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        return False


def status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in bytes, or None where it is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss() -> bool:
    """Set the kernel's peak resident set of this process (VmHWM) to its current RSS (Linux: "5" into
    /proc/self/clear_refs; process-wide: getrusage's ru_maxrss restarts from there too); False where
    that cannot be done or the mark did not come down to the RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = status_bytes("VmHWM"), status_bytes("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + (4 << 20)


class PeakRss:
    """`growth`: the peak resident set while the block ran above the RSS at its start, in bytes. Where
    Linux lets the peak be reset, its own high-water mark (VmHWM), which costs the timed code nothing;
    elsewhere an `RssSampler` (RSS only), whose thread wakes every 5 ms on the timed code's core (a
    gathered-kernel forward at 64K tokens ran 3-6% slower beside it, one pinned core). The
    high-water mark counts file-backed pages too (code a first call maps in: a few MiB)."""

    def __enter__(self) -> PeakRss:
        self.growth = 0
        self._sampler = None
        if reset_peak_rss():
            self._base = status_bytes("VmRSS")
        else:
            self._base = current_rss()
            self._sampler = RssSampler(heap=False).__enter__()
        return self

    def __exit__(self, *exc):
        if self._sampler is None:
            self.growth = max(0, status_bytes("VmHWM") - self._base)
        else:
            self._sampler.__exit__(*exc)
            self.growth = max(0, self._sampler.peak - self._base)
        return False


@contextlib.contextmanager
def torch_threads(threads: int):
    """Run with `threads` intra-op threads (0 = leave torch's setting), restoring it after."""
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_matmul_peak(
    dtype: str | torch.dtype = "float32", threads: int = 0, seconds: float = 1.5, device: torch.device | str = "cpu"
) -> float:
    """Best torch.mm rate in GFLOP/s over square n x n products, n in 1024..2048 on a CPU
    (4096..16384 on a GPU, timed after a device synchronize).

    Each size gets an equal share of `seconds`; a size whose single product would overrun the
    remaining time is skipped (slow dtypes then measure at 1024 only). 2 n^3 FLOPs per product."""
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    device = torch.device(device)
    sizes = (4096, 8192, 16384) if device.type == "cuda" else (1024, 1536, 2048)
    best = 0.0
    gen = torch.Generator(device=device).manual_seed(0)  # drawn where they are used (16384^2 on a GPU)
    with torch_threads(threads), torch.no_grad():
        deadline = time.perf_counter() + seconds
        for i, n in enumerate(sizes):
            a = torch.randn(n, n, generator=gen, device=device).to(dt)
            b = torch.randn(n, n, generator=gen, device=device).to(dt)
            out = torch.empty(n, n, dtype=dt, device=device)
            share_end = time.perf_counter() + (deadline - time.perf_counter()) / (len(sizes) - i)
            last = None
            if device.type == "cuda":  # a GPU's first product of a shape picks its kernel
                torch.mm(a, b, out=out)
                synchronize(device)
            while True:
                t0 = time.perf_counter()
                torch.mm(a, b, out=out)
                synchronize(device)
                last = time.perf_counter() - t0
                best = max(best, 2 * n**3 / last / 1e9)
                if time.perf_counter() + last > share_end:
                    break
            del a, b, out
            # the next size costs ~(n'/n)^3 times more; stop when it cannot fit once
            if i + 1 < len(sizes) and time.perf_counter() + last * (sizes[i + 1] / n) ** 3 > deadline:
                break
    return best


def device_info(device: torch.device) -> dict:
    """The device fields of a result's machine record."""
    info = {"device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
