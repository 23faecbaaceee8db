"""llama.cpp's Q4_K parameterization: the scale math of int4 codes with two-level 6-bit scales and minimums.

A Q4_K super-block holds 256 weights of a row in 8 sub-blocks of 32. Each sub-block ``j`` has an
unsigned 4-bit code per weight and ``W = d * sc_j * q - dmin * m_j``: ``sc_j`` and ``m_j`` are 6-bit
integers (0..63), ``d`` and ``dmin`` one fp16 each per super-block. So a sub-block's scale
``s_j = d * sc_j`` and minimum ``mn_j = dmin * m_j`` are themselves quantized: hubtool tunes the codes
against exactly these stored values (:func:`kquant_scales`), as it tunes the other formats' codes
against their fp16 scales.

From a sub-block's clipped range ``a = alpha * wmin <= 0 <= b = beta * wmax`` the raw scale is
``(b - a) / 15`` and the raw minimum ``-a``; :func:`two_level` rounds each to its 6-bit code on the
super-block's fp16 step (the largest raw value over 63, as llama.cpp's ``quantize_row_q4_K_ref``), and
the codes are ``clamp(round((w + mn) / s), 0, 15)``. Where the range starts (:func:`fit_clip`) is
llama.cpp's own fit of each group (``make_qkx2_quants``), so that hubtool's RTN in this form is llama.cpp's
Q4_K, and the clipping search and SignRound move from there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

QK_K = 256  # weights per super-block
SUB_BLOCK = 32  # weights per sub-block (hubtool's group size in this parameterization)
SUBS = QK_K // SUB_BLOCK
SIX_BIT_MAX = 63
CODE_MAX = 15
FIELDS = ("d", "dmin", "sc", "m")  # KQuantScales' tensors, in order


@dataclass
class KQuantScales:
    """The stored two-level scales of a Q4_K weight (N rows, K columns).

    ``d`` / ``dmin``: float16 (N, K // 256); ``sc`` / ``m``: uint8 (N, K // 32), 6-bit.
    """

    d: torch.Tensor
    dmin: torch.Tensor
    sc: torch.Tensor
    m: torch.Tensor

    def scale(self) -> torch.Tensor:
        """Each sub-block's scale ``d * sc`` in float32 (N, K // 32); exact (an fp16 times a 6-bit integer)."""
        return _expand(self.d) * self.sc.float()

    def minimum(self) -> torch.Tensor:
        """Each sub-block's minimum ``dmin * m`` in float32 (N, K // 32); exact."""
        return _expand(self.dmin) * self.m.float()

    def rows(self, r: slice) -> KQuantScales:
        """These scales for rows ``r``."""
        return KQuantScales(self.d[r], self.dmin[r], self.sc[r], self.m[r])

    def to(self, device: torch.device | str) -> KQuantScales:
        """A copy on ``device``."""
        return KQuantScales(*(t.to(device) for t in (self.d, self.dmin, self.sc, self.m)))

    def permute_rows(self, fn) -> KQuantScales:
        """The scales with ``fn`` applied to each tensor's first dimension (rows)."""
        return KQuantScales(*(fn(t).contiguous() for t in (self.d, self.dmin, self.sc, self.m)))


def _expand(per_super: torch.Tensor) -> torch.Tensor:
    """(N, S) per super-block -> (N, S * 8) per sub-block, float32."""
    return per_super.float().repeat_interleave(SUBS, dim=-1)


def two_level(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-negative values per sub-block (N, K // 32) as 6-bit codes on a per-super-block step (the largest
    value over 63, stored in fp16): (step float16 (N, K // 256), codes uint8 (N, K // 32), step * code float32)."""
    n, subs = values.shape
    v = values.float().reshape(n, subs // SUBS, SUBS)
    vmax = v.amax(-1, keepdim=True)
    # llama.cpp's rule: codes from the unrounded step (63 / max), the step stored in fp16
    inv = torch.where(vmax > 0, SIX_BIT_MAX / torch.where(vmax > 0, vmax, 1.0), 0.0)
    codes = torch.round(inv * v).clamp(0, SIX_BIT_MAX)
    step = (vmax / SIX_BIT_MAX).to(torch.float16)
    return step.squeeze(-1), codes.reshape(n, subs).to(torch.uint8), (step.float() * codes).reshape(n, subs)


def kquant_scales(
    wmin: torch.Tensor, wmax: torch.Tensor, alpha: torch.Tensor | float, beta: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor, KQuantScales]:
    """Stored scale and minimum per sub-block (float32 (N, K // 32)) from the clipped ranges, and the
    two-level scales they come from. ``wmin <= 0 <= wmax`` per sub-block."""
    lo = wmin * alpha
    d, sc, scale = two_level((wmax * beta - lo) / CODE_MAX)
    dmin, m, minimum = two_level(-lo)
    return scale, minimum, KQuantScales(d, dmin, sc, m)


def kquant_codes(
    wg: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, offset: torch.Tensor | None = None
) -> torch.Tensor:
    """Codes (float32, grouped like ``wg`` (N, K // 32, 32)) ``clamp(round((w + mn) / s + offset), 0, 15)``."""
    s = torch.where(scale > 0, scale, 1.0).unsqueeze(-1)  # a zero scale: every code gives -mn
    x = (wg.float() + minimum.unsqueeze(-1)) / s
    if offset is not None:
        x = x + offset
    return torch.round(x).clamp_(0, CODE_MAX)


def fit_scale_min(x: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """(scale, -min, codes 0..nmax) per row of x (G, 32): llama.cpp's make_qkx2_quants (weights av_x + |x|,
    no MAD): from the row's range, ``nstep`` + 1 grids are tried and each fitted by weighted least squares."""
    w = torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1]) + x.abs()
    sum_w = w.sum(-1, keepdim=True)
    sum_x = (w * x).sum(-1, keepdim=True)
    lo = x.min(dim=-1, keepdim=True).values.clamp(max=0.0)
    hi = x.max(dim=-1, keepdim=True).values
    flat = hi == lo
    span = torch.where(flat, torch.ones_like(hi), hi - lo)
    iscale = nmax / span
    scale = 1.0 / iscale
    best_l = torch.round(iscale * (x - lo)).clamp_(0, nmax)
    best_err = (w * (scale * best_l + lo - x).square()).sum(-1, keepdim=True)
    mn = lo
    f32 = np.float32
    for step in range(nstep + 1):
        # llama.cpp's loop reads its running min: a step after an improvement grids from the new min
        factor = float(f32(f32(rmin) + f32(rdelta) * f32(step)) + f32(nmax))
        span = hi - mn
        span = torch.where(span == 0, torch.ones_like(span), span)
        lf = torch.round((factor / span) * (x - mn)).clamp_(0, nmax)
        wl = w * lf
        sum_l, sum_l2, sum_xl = (
            wl.sum(-1, keepdim=True),
            (wl * lf).sum(-1, keepdim=True),
            (wl * x).sum(-1, keepdim=True),
        )
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe = torch.where(ok, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        l2 = torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2))
        this_scale = torch.where(pos, sum_xl / l2, this_scale)
        err = (w * (this_scale * lf + this_min - x).square()).sum(-1, keepdim=True)
        better = ok & (err < best_err)
        best_l = torch.where(better, lf, best_l)
        best_err = torch.where(better, err, best_err)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    best_l = torch.where(flat, torch.zeros_like(best_l), best_l)
    return scale.squeeze(-1), (-mn).squeeze(-1), best_l


FIT_MAX = (
    2.0  # how far alpha / beta may stretch a range end in this parameterization (a fit may pass the ends)
)
Q4_K_FIT = (CODE_MAX, -1.0, 0.1, 20)  # quantize_row_q4_K_ref's make_qkx2_quants(nmax, rmin, rdelta, nstep)


def fit_clip(wg: torch.Tensor, fit=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The range factors (alpha, beta) per group of 32 (N, K // 32) that give llama.cpp's Q4_K fit of each
    group's scale and minimum (its ``make_qkx2_quants``): hubtool's RTN in this form, and where the clipping
    search and SignRound start. ``fit``: another implementation of :func:`fit_scale_min` (the C++ one)."""
    n, groups, g = wg.shape
    x = wg.float().reshape(-1, g)
    scale, neg_min, _ = (fit or fit_scale_min)(x, *Q4_K_FIT)
    lo, hi = -neg_min.reshape(n, groups), (CODE_MAX * scale).reshape(n, groups) - neg_min.reshape(n, groups)
    wmin, wmax = wg.amin(-1).float().clamp(max=0), wg.amax(-1).float().clamp(min=0)
    alpha = torch.where(wmin < 0, lo / torch.where(wmin < 0, wmin, -1.0), 1.0)
    beta = torch.where(wmax > 0, hi / torch.where(wmax > 0, wmax, 1.0), 1.0)
    return alpha.clamp_(0.0, FIT_MAX), beta.clamp_(0.0, FIT_MAX)


def check_shape(k: int) -> bool:
    """Whether a row of ``k`` weights splits into whole Q4_K super-blocks."""
    return k % QK_K == 0
