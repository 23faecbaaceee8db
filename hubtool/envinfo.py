"""What `hubtool env` reports: versions, devices, CPU features, kernel backends."""

from __future__ import annotations

import platform
from typing import Any

import torch

from .__about__ import __version__


def environment() -> dict[str, Any]:
    """Versions, devices and the kernel backend chosen for a typical call on each device."""
    from .pipeline import _versions
    from .runtime.backends import available_backends, select_backend
    from .runtime.int4linear import Int4Linear

    info: dict[str, Any] = {"hubtool": __version__, "python": platform.python_version()}
    info["libraries"] = _versions()
    info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    info["threads"] = torch.get_num_threads()
    info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info["backends"] = available_backends()
    layer = Int4Linear(4096, 4096, bias=False)
    chosen = {}
    for m in (1, 8, 32):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            x = torch.empty(m, 4096, dtype=dtype)
            chosen[f"cpu M={m} {str(dtype).removeprefix('torch.')}"] = select_backend(layer, x).name
    info["auto_backend"] = chosen
    try:
        from .kernels import kernel_info

        info["kernels"] = kernel_info()
    except ImportError:
        info["kernels"] = None
    return info
