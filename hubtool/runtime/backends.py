"""Kernel backends behind Int4Linear and the dispatch that picks one.

A backend turns the layer's GPTQ tensors into whatever layout it computes from (``prepare``, done once
per layer and device and cached on the layer, never saved) and multiplies 2-D activations by it
(``matmul``). ``HUBTOOL_KERNEL=reference|torch|hubtool`` forces one; otherwise ``auto`` picks the
fastest backend that supports the device, dtype and number of rows.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from ..core import packing

if TYPE_CHECKING:
    from .int4linear import Int4Linear

log = logging.getLogger(__name__)
ENV_VAR = "HUBTOOL_KERNEL"


class Backend(Protocol):
    """What a kernel backend provides."""

    name: str

    def supports(self, layer: Int4Linear, x: torch.Tensor) -> bool:
        """Whether this backend can compute ``layer(x)`` exactly enough."""

    def prepare(self, layer: Int4Linear, device: torch.device) -> Any:
        """Repack the layer's tensors for this backend (cached by the caller)."""

    def matmul(self, x: torch.Tensor, prepared: Any, layer: Int4Linear) -> torch.Tensor:
        """(M, K) activations times the int4 weight -> (M, N) in x's dtype (bias not added)."""


class ReferenceBackend:
    """Dequantize to the activation dtype, then a dense matmul: any device, any dtype, any g_idx."""

    name = "reference"

    def supports(self, layer: Int4Linear, x: torch.Tensor) -> bool:
        """Always."""
        return True

    def prepare(self, layer: Int4Linear, device: torch.device) -> Any:
        """Nothing to repack: the weight is rebuilt at each call (so memory stays int4)."""
        return None

    def matmul(self, x: torch.Tensor, prepared: Any, layer: Int4Linear) -> torch.Tensor:
        """Dequantize in fp32, cast to x's dtype, F.linear."""
        w = packing.dequantize(
            layer.qweight, layer.qzeros, layer.scales, layer.g_idx_or_none(), dtype=torch.float32
        )
        return F.linear(x, w.to(x.dtype))


class TorchBackend:
    """torch's built-in int4 kernels: ``_weight_int4pack_mm_for_cpu`` (bf16) and ``_weight_int4pack_mm`` (CUDA)."""

    name = "torch"

    def supports(self, layer: Int4Linear, x: torch.Tensor) -> bool:
        """Trivial g_idx, K a multiple of 32, N a multiple of 16 (CPU) or 64 (CUDA, bf16 only)."""
        if not layer.trivial_g_idx or layer.in_features % 32 or layer.out_features % 8:
            return False
        if x.device.type == "cuda":
            return x.dtype == torch.bfloat16 and layer.out_features % 64 == 0
        # _convert_weight_to_int4pack_for_cpu needs N divisible by 16.
        return x.device.type == "cpu" and layer.out_features % 16 == 0

    def prepare(self, layer: Int4Linear, device: torch.device) -> Any:
        """Convert to torch's packed layout and its (scale, zero) pairs: W = (q - 8) * s + (8 - z) * s."""
        iw = packing.unpack(layer.packed_tensors())
        q = iw.q.to(torch.int32)  # (N, K) in [0, 15]
        scale = iw.scale.float()  # (N, K/G)
        zero_f = (8.0 - iw.zero.float()) * scale
        sz = torch.stack([scale.t(), zero_f.t()], dim=-1).contiguous()  # (K/G, N, 2)
        if device.type == "cuda":
            q_u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).to(device)
            packed = torch.ops.aten._convert_weight_to_int4pack(q_u8, 8)
            return packed, sz.to(device=device, dtype=torch.bfloat16)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        return packed, sz.to(torch.bfloat16)

    def matmul(self, x: torch.Tensor, prepared: Any, layer: Int4Linear) -> torch.Tensor:
        """Run the built-in kernel in bf16 and cast back to x's dtype."""
        packed, sz = prepared
        xb = x.to(torch.bfloat16)
        if x.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(xb, packed, layer.group_size, sz)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, layer.group_size, sz)
        return y.to(x.dtype)


_BACKENDS: dict[str, Backend] = {"reference": ReferenceBackend(), "torch": TorchBackend()}


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend under its name."""
    _BACKENDS[backend.name] = backend


def available_backends() -> list[str]:
    """Names of the registered backends."""
    _load_optional_backends()
    return list(_BACKENDS)


def get_backend(name: str) -> Backend:
    """The backend registered under ``name``."""
    _load_optional_backends()
    if name not in _BACKENDS:
        from ..errors import HubtoolError

        raise HubtoolError(f"unknown kernel backend {name!r}", "use one of " + ", ".join(_BACKENDS))
    return _BACKENDS[name]


# Order of preference for "auto", best first. Our kernels register themselves in front when they load.
AUTO_ORDER: list[str] = ["torch", "reference"]
_optional_loaded = False


def _load_optional_backends() -> None:
    """Import hubtool's own kernels (CPU C++ and GPU Triton) if present; they register themselves."""
    global _optional_loaded
    if _optional_loaded:
        return
    _optional_loaded = True
    try:
        from ..kernels import register as _register_kernels
    except ImportError:
        return
    _register_kernels()


def select_backend(layer: Int4Linear, x: torch.Tensor, requested: str | None = None) -> Backend:
    """The backend to run ``layer(x)``: forced by argument or $HUBTOOL_KERNEL, else the best that supports it."""
    _load_optional_backends()
    name = requested or os.environ.get(ENV_VAR) or "auto"
    if name != "auto":
        backend = get_backend(name)
        if backend.supports(layer, x):
            return backend
        log.debug("backend %s does not support this call; falling back to reference", name)
        return _BACKENDS["reference"]
    for candidate in AUTO_ORDER:
        backend = _BACKENDS.get(candidate)
        if backend is not None and backend.supports(layer, x) and _prefers(backend, layer, x):
            return backend
    return _BACKENDS["reference"]


def _prefers(backend: Backend, layer: Int4Linear, x: torch.Tensor) -> bool:
    """Whether auto should use this backend at this shape (a backend may say it is slower than another)."""
    pref = getattr(backend, "prefers", None)
    return True if pref is None else bool(pref(layer, x))
