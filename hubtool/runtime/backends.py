"""Kernel backends behind Int4Linear and the dispatch that picks one.

A backend turns a layer's GPTQ tensors into whatever layout it computes from (``prepare``, done once
per layer and device and cached on the layer, never saved) and multiplies 2-D activations by it
(``matmul``). Three backends: ``hubtool`` (our kernels, ``kernels.cpu`` / ``kernels.gpu``), ``torch``
(torch's built-in int4 kernels) and ``reference`` (dequantize + matmul, runs anything).
``HUBTOOL_KERNEL=reference|torch|hubtool`` forces one; otherwise ``auto`` takes the first in
``AUTO_ORDER`` that supports the device, dtype and shape. A layer is anything with ``Int4Layer``'s
fields (``runtime.int4linear.Int4Linear``), so this module does not import the layer.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ..core import packing
from ..errors import HubtoolError
from ..kernels import cpu, gpu, kernel_info

log = logging.getLogger(__name__)
ENV_VAR = "HUBTOOL_KERNEL"
HUBTOOL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class Int4Layer(Protocol):
    """What a backend reads of a layer: its sizes and its GPTQ v1 tensors (``Int4Linear`` has them)."""

    in_features: int
    out_features: int
    group_size: int
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor

    @property
    def trivial_g_idx(self) -> bool:
        """Whether groups are contiguous runs of G input rows (no act-order)."""

    def g_idx_or_none(self) -> torch.Tensor | None:
        """g_idx when it is not the trivial k // G, else None."""

    def packed_tensors(self) -> packing.GPTQTensors:
        """The layer's GPTQ tensors (on the CPU)."""


class Backend(Protocol):
    """What a kernel backend provides."""

    name: str

    def supports(self, layer: Int4Layer, x: torch.Tensor) -> bool:
        """Whether this backend can compute ``layer(x)`` exactly enough."""

    def prepare(self, layer: Int4Layer, device: torch.device) -> Any:
        """Repack the layer's tensors for this backend (cached by the caller)."""

    def matmul(self, x: torch.Tensor, prepared: Any, layer: Int4Layer) -> torch.Tensor:
        """(M, K) activations times the int4 weight -> (M, N) in x's dtype (bias not added)."""


class ReferenceBackend:
    """Dequantize to the activation dtype, then a dense matmul: any device, any dtype, any g_idx."""

    name = "reference"

    def supports(self, layer: Int4Layer, x: torch.Tensor) -> bool:
        """Always."""
        return True

    def prepare(self, layer: Int4Layer, device: torch.device) -> Any:
        """Nothing to repack: the weight is rebuilt at each call (so memory stays int4)."""
        return None

    def matmul(self, x: torch.Tensor, prepared: Any, layer: Int4Layer) -> torch.Tensor:
        """Dequantize in fp32, cast to x's dtype, F.linear."""
        w = packing.dequantize(
            layer.qweight, layer.qzeros, layer.scales, layer.g_idx_or_none(), dtype=torch.float32
        )
        return F.linear(x, w.to(x.dtype))


class TorchBackend:
    """torch's built-in int4 kernels: ``_weight_int4pack_mm_for_cpu`` (bf16) and ``_weight_int4pack_mm`` (CUDA)."""

    name = "torch"

    def supports(self, layer: Int4Layer, x: torch.Tensor) -> bool:
        """Trivial g_idx, K a multiple of 32, N a multiple of 16 (CPU) or 64 (CUDA, bf16 only)."""
        if not layer.trivial_g_idx or layer.in_features % 32 or layer.out_features % 8:
            return False
        if x.device.type == "cuda":
            return x.dtype == torch.bfloat16 and layer.out_features % 64 == 0
        # _convert_weight_to_int4pack_for_cpu needs N divisible by 16.
        return x.device.type == "cpu" and layer.out_features % 16 == 0

    def prepare(self, layer: Int4Layer, device: torch.device) -> Any:
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

    def matmul(self, x: torch.Tensor, prepared: Any, layer: Int4Layer) -> torch.Tensor:
        """Run the built-in kernel in bf16 and cast back to x's dtype."""
        packed, sz = prepared
        xb = x.to(torch.bfloat16)
        if x.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(xb, packed, layer.group_size, sz)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, layer.group_size, sz)
        return y.to(x.dtype)


class HubtoolBackend:
    """Our kernels: C++ (AVX-512 BF16 / AVX-512 / AVX2 / scalar) on the CPU, Triton on CUDA.

    Auto uses them first at every M: measured faster than torch's built-in and bf16 matmul (see
    ``bench_kernels``). Where the CPU kernel could not be built, ``supports`` is False on the CPU.
    """

    name = "hubtool"

    def supports(self, layer: Int4Layer, x: torch.Tensor) -> bool:
        """Trivial g_idx, an even group size, a float dtype, and the kernel for x's device available."""
        if not layer.trivial_g_idx or x.dtype not in HUBTOOL_DTYPES or layer.group_size % 2:
            return False
        if x.device.type == "cpu":
            return cpu.runs_on(x.device)
        if x.device.type == "cuda":
            return gpu.available() and layer.group_size % 16 == 0
        return False

    def prepare(self, layer: Int4Layer, device: torch.device) -> Any:
        """Repack once per device: 64-column blocks of nibble pairs (CPU) or the GPTQ tensors as they are (CUDA)."""
        iw = packing.unpack(layer.packed_tensors())
        if device.type == "cuda":
            return gpu.prepare(layer.qweight, iw.zero.t(), layer.scales, layer.group_size, device)
        return cpu.repack(iw.q, iw.scale, iw.zero, layer.group_size)

    def matmul(self, x: torch.Tensor, prepared: Any, layer: Int4Layer) -> torch.Tensor:
        """(M, K) x int4 -> (M, N) in x's dtype."""
        if x.device.type == "cuda":
            return gpu.int4_mm(x, prepared)
        return cpu.int4_mm(x, prepared)


_BACKENDS: dict[str, Backend] = {
    "reference": ReferenceBackend(),
    "torch": TorchBackend(),
    "hubtool": HubtoolBackend(),
}
# Order of preference for "auto", best first.
AUTO_ORDER = ("hubtool", "torch", "reference")


def available_backends() -> list[str]:
    """Names of the backends."""
    return list(_BACKENDS)


def get_backend(name: str) -> Backend:
    """The backend registered under ``name``."""
    if name not in _BACKENDS:
        raise HubtoolError(f"unknown kernel backend {name!r}", "use one of " + ", ".join(_BACKENDS))
    return _BACKENDS[name]


def select_backend(layer: Int4Layer, x: torch.Tensor, requested: str | None = None) -> Backend:
    """The backend to run ``layer(x)``: forced by argument or $HUBTOOL_KERNEL, else the first in AUTO_ORDER that supports it."""
    name = requested or os.environ.get(ENV_VAR) or "auto"
    if name != "auto":
        backend = get_backend(name)
        if backend.supports(layer, x):
            return backend
        log.debug("backend %s does not support this call; falling back to reference", name)
        return _BACKENDS["reference"]
    for candidate in AUTO_ORDER:
        backend = _BACKENDS[candidate]
        if backend.supports(layer, x):
            return backend
    return _BACKENDS["reference"]


def describe_kernels(build: bool = False) -> dict:
    """``kernels.kernel_info`` (availability, ISA, build folder) plus auto's order and the forced backend."""
    return {
        **kernel_info(build=build),
        "auto_order": list(AUTO_ORDER),
        "forced": os.environ.get(ENV_VAR) or None,
    }
