"""What `hubtool env` reports: versions, devices, CPU features, kernel backends."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

import torch

from .__about__ import __version__
from .runtime.backends import available_backends, describe_kernels, select_backend
from .runtime.int4linear import Int4Linear

LIBRARIES = ("torch", "transformers", "huggingface_hub", "safetensors", "accelerate", "auto-round", "optimum")


def library_versions() -> dict[str, str]:
    """Python's, hubtool's and the installed LIBRARIES' versions (what a run record and `hubtool env` show)."""
    out = {"python": platform.python_version(), "hubtool": __version__}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def environment() -> dict[str, Any]:
    """Versions, devices and the kernel backend chosen for a typical call on each device."""
    info: dict[str, Any] = {"hubtool": __version__, "python": platform.python_version()}
    info["libraries"] = library_versions()
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
    info["kernels"] = describe_kernels()
    return info
