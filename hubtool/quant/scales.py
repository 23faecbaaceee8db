"""Scales from clipped ranges, rounded to fp16: what the clipping search tries and SignRound tunes.

Per group the range ends ``wmin <= 0 <= wmax`` are clipped by ``alpha`` (the negative end) and ``beta``
(the positive end); the scale is core's (:func:`..core.intweight.full_range_scale` for symmetric,
:func:`..core.intweight.range_scale` for asymmetric) rounded with :func:`..core.intweight.fp16_exact`, so
that codes are chosen against the scale every format stores. The asymmetric zero point is rounded from
that stored scale. On the CPU the symmetric scale runs as one C++ pass (``hubtool::sym_scale``, the same
arithmetic per element), as do SignRound's and the search's elementwise passes where
:func:`fused_available` says so (``HUBTOOL_SIGNROUND_FUSED=0`` turns them all off).
"""

from __future__ import annotations

import os

import torch

from ..core.intweight import fp16_exact, full_range_scale, range_scale
from ..core.spec import QuantSpec

FUSED_ENV = "HUBTOOL_SIGNROUND_FUSED"  # "0": the torch code on the CPU too
_FUSED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_FUSED: dict[str, bool] = {}  # "ok": whether the C++ kernels run (decided once)


def kernels_on(t: torch.Tensor) -> bool:
    """Whether the C++ kernels run for tensors on t's device (CPU, library built, not turned off)."""
    if t.device.type != "cpu":
        return False
    if "ok" not in _FUSED:
        from ..kernels import cpu

        _FUSED["ok"] = os.environ.get(FUSED_ENV, "1") != "0" and cpu.load()
    return _FUSED["ok"]


def fused_available(wg: torch.Tensor) -> bool:
    """Whether the fused C++ passes run for this grouped weight (CPU, contiguous, G % 16 == 0, library built)."""
    return wg.is_contiguous() and wg.dtype in _FUSED_DTYPES and not wg.shape[-1] % 16 and kernels_on(wg)


def sym_scale(
    wmin: torch.Tensor, wmax: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-range symmetric scale per group (fp16-exact) and whether it came from the negative end."""
    ts = (wmin, wmax, alpha, beta)
    if all(
        t.shape == wmin.shape and t.dtype == torch.float32 and t.is_contiguous() for t in ts
    ) and kernels_on(wmin):
        return torch.ops.hubtool.sym_scale(wmin, wmax, alpha, beta, spec.sym_zero)
    scale, negative = full_range_scale(wmin * alpha, wmax * beta, spec)
    return fp16_exact(scale), negative


def asym_scale_zero(
    wmin: torch.Tensor, wmax: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric scale (fp16-exact), zero point in [1, qmax] and whether the zero is unclamped."""
    lo = wmin * alpha
    scale = fp16_exact(range_scale(lo, wmax * beta, spec))
    z = torch.round(-lo / scale)
    zero = z.clamp(1, spec.qmax)
    return scale, zero, z == zero


def stored_scale_zero(
    wmin: torch.Tensor, wmax: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and zero point per group as stored, for clipping alpha and beta."""
    if spec.sym:
        scale, _ = sym_scale(wmin, wmax, alpha, beta, spec)
        return scale, torch.full_like(scale, float(spec.sym_zero))
    scale, zero, _ = asym_scale_zero(wmin, wmax, alpha, beta, spec)
    return scale, zero


def kquant_fit(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's Q4_K fit of a weight as range factors per group of 32 (:func:`..core.intweight.kquant_fit`),
    with the C++ group fit where the kernels run (the same arithmetic, one loop per group)."""
    from ..core.intweight import kquant_fit as fit_weight

    if kernels_on(w):
        from ..kernels import cpu

        return fit_weight(w, cpu.fit_scale_min)
    return fit_weight(w)
