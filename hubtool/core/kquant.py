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
the codes are ``clamp(round((w + mn) / s), 0, 15)``.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """Non-negative values per sub-block (N, K // 32) as 6-bit codes on a per-super-block fp16 step:
    (step float16 (N, K // 256), codes uint8 (N, K // 32), step * code float32)."""
    n, subs = values.shape
    v = values.float().reshape(n, subs // SUBS, SUBS)
    step = (v.amax(-1) / SIX_BIT_MAX).to(torch.float16)
    s = step.float().unsqueeze(-1)
    codes = torch.where(s > 0, torch.round(v / torch.where(s > 0, s, 1.0)), 0.0).clamp(0, SIX_BIT_MAX)
    return step, codes.reshape(n, subs).to(torch.uint8), (s * codes).reshape(n, subs)


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


def check_shape(k: int) -> bool:
    """Whether a row of ``k`` weights splits into whole Q4_K super-blocks."""
    return k % QK_K == 0
