"""hubtool's own int4 kernels, ops only: a C++ CPU kernel (``cpu``) and Triton GPU kernels (``gpu``).

Nothing is compiled at import: the CPU kernel builds at first use (or by ``build_cpu_kernel()``, i.e.
``hubtool kernels build``) into a cache folder; if it cannot be built, ``cpu.load()`` is False (one
warning logged). Which kernel runs a layer, and the fallback to torch's built-in one, is the choice of
``runtime.backends``; this package imports nothing above floor 0.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..errors import HubtoolError
from . import cpu, gpu


def build_cpu_kernel(verbose: bool = False) -> str:
    """Compile (or load from the cache) the CPU kernel now; returns the library's path.

    Raises HubtoolError if it cannot be built (at first use the same failure only logs a warning).
    """
    if not cpu.load(verbose=verbose):
        raise HubtoolError(
            f"the CPU int4 kernel could not be built: {cpu.status()['error']}",
            "install a C++ compiler (g++) and ninja; until then hubtool uses torch's built-in int4 kernel",
        )
    return str(cpu.status()["path"])


def _cpu_flags() -> set[str]:
    """CPU feature flags from /proc/cpuinfo (empty where that file does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    return set(m.group(1).split()) if m else set()


def _isa_from_flags(flags: set[str]) -> str:
    """The ISA level the kernel would pick, predicted from /proc/cpuinfo flags."""
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        return "avx512_bf16" if "avx512_bf16" in flags else "avx512"
    if {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return "scalar"


def kernel_info(build: bool = False) -> dict:
    """Which kernels are available, the ISA picked and the build folder (for ``hubtool env``).

    Loads the CPU kernel if it is already built (or if ``build``); never compiles otherwise.
    """
    built = any(cpu.build_dir().glob("*.so"))
    if build or built:
        cpu.load()
    st = cpu.status()
    loaded = bool(st["loaded"])
    flags = _cpu_flags()
    forced = os.environ.get(cpu.ISA_ENV) or None
    info_cpu = {
        "available": loaded,
        "built": built or loaded,
        "isa": cpu.detected_isa() if loaded else _isa_from_flags(flags),
        "isa_forced": forced,
        "vnni": cpu.has_vnni() if loaded else "avx512_vnni" in flags,
        "build_dir": str(cpu.build_dir()),
        "error": st["error"],
        "fallback": None if loaded else "torch",
    }
    info_gpu = {
        "available": gpu.available(),
        "triton": getattr(gpu.triton_int4.triton, "__version__", None),
        "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "interpret": gpu.interpreting(),
    }
    return {"cpu": info_cpu, "gpu": info_gpu}
