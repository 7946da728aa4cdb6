"""C++ kernels (csrc/), compiled on first use through torch.utils.cpp_extension and cached.

    csrc/gathered_attention.cpp   DSA's softmax over each query's picked keys, forward and backward,
                                  reading the picked rows in place (kernels/dsa.py's GatheredAttention;
                                  kernels/csa.py runs CSA's window + entries + sink through it)
    csrc/indexer_topk.cpp         the top-k keys (DSA) or entries (CSA) per query by radix select, ties
                                  to the earliest (kernels/dsa.py's chunk_picks, kernels/csa.py)

`load(name)` builds csrc/<name>.cpp with g++ and ninja (the `ninja` package is a dependency) into
torch's extension cache (TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions): 25 s on one
Zen-1 core the first time, a fraction of a second in later processes; concurrent builds wait for
each other. The code is built for the vector unit torch reports (`torch.backends.cpu.
get_cpu_capability()`: AVX-512 with its BF16 instructions → those too (the gathered attention then
takes bf16 inputs), AVX2 or AVX-512 → -mavx2 -mfma, else the compiler's baseline) and the cached
library's name says which, so a cache shared by different machines never hands a CPU code it
cannot run. Where the build fails (no compiler, say) `load` warns once and returns None and the
callers keep their PyTorch path; NANOSEEK_NATIVE_KERNELS=0 turns the kernels off.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:  # a missing source is a failed build
    ...     missing = load("no_such_kernel")
    >>> missing is None, "not built" in str(caught[0].message)
    (True, True)
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

SOURCES = Path(__file__).parent / "csrc"
FLAGS = ["-O3", "-ffp-contract=fast"]  # contract a * b + c into fused multiply-adds


AVX2 = ["-mavx2", "-mfma"]
AVX512_BF16 = [*AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16"]


def vector_targets() -> list[tuple[str, list[str]]]:
    """(name, compiler flags) for this CPU's vector unit, best first: a compiler that cannot build
    the first (AVX-512 BF16 needs GCC 10 or later) builds the next."""
    capability = torch.backends.cpu.get_cpu_capability()
    targets = []
    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)  # private: absent, no bf16 target
    if capability == "AVX512" and bf16():
        targets.append(("avx512bf16", AVX512_BF16))
    if capability in ("AVX2", "AVX512"):
        targets.append(("avx2", AVX2))
    return targets or [("baseline", [])]


BUILT: dict[str, str] = {}  # kernel name -> the target it was built for


def bf16_kernels() -> bool:
    """Whether the gathered attention takes bf16 inputs (built for AVX-512 BF16: its vdpbf16ps loops)."""
    return load("gathered_attention") is not None and BUILT.get("gathered_attention") == "avx512bf16"


def enabled() -> bool:
    return os.environ.get("NANOSEEK_NATIVE_KERNELS", "1") != "0"


@functools.cache
def load(name: str):
    """torch.ops.nanoseek once csrc/<name>.cpp's ops are registered in it, or None (disabled, or the
    build failed for every target: one warning)."""
    if not enabled():
        return None
    source = SOURCES / f"{name}.cpp"
    reason = ""
    for target, flags in vector_targets():
        try:
            if not source.exists():
                raise FileNotFoundError(source)
            from torch.utils import cpp_extension

            put_ninja_on_path()
            cpp_extension.load(
                name=f"nanoseek_{name}_{target}",
                sources=[str(source)],
                extra_cflags=FLAGS + flags,
                is_python_module=False,  # a plain library: loading it registers its torch ops
                verbose=False,
            )
            BUILT[name] = target
            if reason:  # a better target failed: say so once, the kernel still runs
                warnings.warn(f"C++ kernel {name!r} built for {target} ({reason})", stacklevel=2)
            return torch.ops.nanoseek
        except Exception as exc:  # no compiler, no ninja, a failed build: the next target, or PyTorch
            reason = f"{target} not built: " + (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    warnings.warn(f"C++ kernel {name!r} not built ({reason}); using the PyTorch path", stacklevel=2)
    return None


def put_ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH; a virtual environment's own bin may not be on it."""
    if shutil.which("ninja") is None:
        here = str(Path(sys.executable).parent)
        if Path(here, "ninja").exists():
            os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")
