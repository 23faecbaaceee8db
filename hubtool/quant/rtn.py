"""Round-to-nearest int4 quantization of a weight matrix, per group along the input dimension."""

from __future__ import annotations

import torch

from ..core.intweight import IntWeight, fp16_exact, quantize_kquant, quantize_with, scales_from_range
from ..core.spec import QuantSpec
from .scales import kquant_fit


def quantize_rtn(w: torch.Tensor, spec: QuantSpec) -> IntWeight:
    """Plain round-to-nearest with the full-range scale (no search, no tuning)."""
    if spec.kquant:
        return quantize_kquant(w, *kquant_fit(w))
    n, k = w.shape
    scale, zero = scales_from_range(w.reshape(n, k // spec.group_size, spec.group_size), spec)
    return quantize_with(w, spec, fp16_exact(scale), zero)
