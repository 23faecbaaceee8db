"""hubtool's own int4 kernels: a C++ CPU kernel and Triton GPU kernels, behind the ``hubtool`` backend.

``register()`` (called by ``runtime.backends`` when it first dispatches) adds the backend and puts it
first in ``AUTO_ORDER``. Nothing is compiled at import: the CPU kernel builds at first use (or by
``build_cpu_kernel()``, i.e. ``hubtool kernels build``) into a cache folder; if it cannot be built,
``supports()`` is False on the CPU and auto falls back to torch's built-in kernel (one warning logged).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import cpu, gpu

if TYPE_CHECKING:
    from ..runtime.int4linear import Int4Linear

log = logging.getLogger(__name__)

BACKEND_NAME = "hubtool"
CPU_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class HubtoolBackend:
    """Our kernels: C++ (AVX-512 BF16 / AVX-512 / AVX2 / scalar) on the CPU, Triton on CUDA."""

    name = BACKEND_NAME

    def supports(self, layer: Int4Linear, x: torch.Tensor) -> bool:
        """Trivial g_idx, an even group size, a float dtype, and the kernel for x's device available."""
        if not layer.trivial_g_idx or x.dtype not in CPU_DTYPES or layer.group_size % 2:
            return False
        if x.device.type == "cpu":
            return cpu.load()
        if x.device.type == "cuda":
            return gpu.available() and layer.group_size % 16 == 0
        return False

    def prefers(self, layer: Int4Linear, x: torch.Tensor) -> bool:
        """Auto uses us at every M: measured faster than torch's built-in and bf16 matmul (see bench_kernels)."""
        return True

    def prepare(self, layer: Int4Linear, device: torch.device) -> Any:
        """Repack once per device: 64-column blocks of nibble pairs (CPU) or the GPTQ tensors as they are (CUDA)."""
        from ..core import packing

        iw = packing.unpack(layer.packed_tensors())
        if device.type == "cuda":
            return gpu.prepare(layer.qweight, iw.zero.t(), layer.scales, layer.group_size, device)
        return cpu.repack(iw.q, iw.scale, iw.zero, layer.group_size)

    def matmul(self, x: torch.Tensor, prepared: Any, layer: Int4Linear) -> torch.Tensor:
        """(M, K) x int4 -> (M, N) in x's dtype."""
        if x.device.type == "cuda":
            return gpu.int4_mm(x, prepared)
        return cpu.int4_mm(x, prepared)


def register() -> None:
    """Register the ``hubtool`` backend and put it first in auto's order."""
    from ..runtime import backends

    backends.register_backend(HubtoolBackend())
    if BACKEND_NAME in backends.AUTO_ORDER:
        backends.AUTO_ORDER.remove(BACKEND_NAME)
    backends.AUTO_ORDER.insert(0, BACKEND_NAME)


def build_cpu_kernel(verbose: bool = False) -> str:
    """Compile (or load from the cache) the CPU kernel now; returns the library's path.

    Raises HubtoolError if it cannot be built (at first use the same failure only logs a warning).
    """
    if not cpu.load(verbose=verbose):
        from ..errors import HubtoolError

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
    from ..runtime import backends

    backends.available_backends()  # registers us if dispatch has not run yet
    return {
        "cpu": info_cpu,
        "gpu": info_gpu,
        "auto_order": list(backends.AUTO_ORDER),
        "forced": os.environ.get(backends.ENV_VAR) or None,
    }
