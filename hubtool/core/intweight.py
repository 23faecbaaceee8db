"""Integer weights and the scale math: codes, scales and zero points per group, and how scales are chosen.

The one copy of the scale math (full-range symmetric and asymmetric scales, the fp16 rounding every
format stores) lives here; RTN, the clipping search and SignRound all call it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kquant import SUB_BLOCK, KQuantScales, fit_clip, kquant_codes, kquant_scales
from .spec import QuantSpec


@dataclass
class IntWeight:
    """A quantized weight: unsigned codes, per-group scales and zero points; W = scale * (q - zero).

    ``q`` is uint8 (N, K) in [0, 2**bits - 1]; ``scale`` is float32 (N, K // G) and may be negative
    (symmetric "full range" puts the largest magnitude on -8); ``zero`` is uint8 (N, K // G)
    (all 8 for symmetric int4).

    In llama.cpp's Q4_K parameterization (``kquant`` set) ``W = scale * q - minimum`` per group of 32,
    with ``scale = d * sc`` and ``minimum = dmin * m`` from :class:`.kquant.KQuantScales`; ``scale`` then
    holds ``d * sc`` and ``zero`` is 0.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int
    bits: int = 4
    kquant: KQuantScales | None = None

    def cpu(self) -> IntWeight:
        """This weight with every tensor on the CPU."""
        kq = self.kquant.to("cpu") if self.kquant is not None else None
        return IntWeight(self.q.cpu(), self.scale.cpu(), self.zero.cpu(), self.group_size, self.bits, kq)

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features)."""
        return tuple(self.q.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        """Return the dense (N, K) weight these codes stand for (written into ``out`` when given)."""
        g = self.group_size
        n, k = self.q.shape
        if out is None:
            out = torch.empty(n, k, dtype=dtype, device=self.q.device)
        for r in row_chunks(n, k):  # float32 temporaries of a few MB, not of the whole weight
            q = self.q[r].float().reshape(-1, k // g, g)
            if self.kquant is not None:
                kq = self.kquant.rows(r)
                w = kq.scale().unsqueeze(-1) * q - kq.minimum().unsqueeze(-1)
            else:
                w = self.scale[r].float().unsqueeze(-1) * (q - self.zero[r].float().unsqueeze(-1))
            out[r] = w.reshape(-1, k).to(dtype)
        return out


@dataclass
class PackedWeight:
    """An IntWeight kept two 4-bit codes per byte (what a long calibration run accumulates, halved)."""

    nibbles: torch.Tensor  # uint8 (N, K // 2): code 2j in the low nibble, 2j+1 in the high one
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int
    kquant: KQuantScales | None = None

    @staticmethod
    def fits(w: IntWeight) -> bool:
        """Whether w packs: 4-bit codes, an even number of columns."""
        return w.bits == 4 and w.q.shape[1] % 2 == 0

    @classmethod
    def pack(cls, w: IntWeight) -> PackedWeight:
        """Pack a 4-bit IntWeight."""
        if not cls.fits(w):
            raise ValueError("only 4-bit codes with an even number of columns pack two per byte")
        q = w.q.to(torch.uint8)
        return cls(q[:, 0::2] | (q[:, 1::2] << 4), w.scale, w.zero, w.group_size, w.kquant)

    def unpack(self) -> IntWeight:
        """The IntWeight again, bit for bit."""
        n, half = self.nibbles.shape
        q = torch.empty(n, 2 * half, dtype=torch.uint8, device=self.nibbles.device)
        q[:, 0::2] = self.nibbles & 0xF
        q[:, 1::2] = self.nibbles >> 4
        return IntWeight(q, self.scale, self.zero, self.group_size, 4, self.kquant)


CHUNK_ELEMENTS = 1 << 22  # 16 MiB of float32: the temporaries of elementwise weight math, per step


def row_chunks(n: int, k: int) -> list[slice]:
    """Row slices of an (n, k) weight, each about CHUNK_ELEMENTS elements (elementwise math gives the same bits)."""
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Reshape (N, K) to (N, K // G, G) in float32."""
    n, k = w.shape
    return w.float().reshape(n, k // group_size, group_size)


def scales_from_range(
    wg: torch.Tensor, spec: QuantSpec, alpha: torch.Tensor | float = 1.0, beta: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points for grouped weights (N, G#, G), with the range clipped by alpha/beta.

    Symmetric uses auto-round's "full range": scale = max_v / 2**(bits-1) where max_v is the signed value
    of largest magnitude, so that value maps exactly onto the code -2**(bits-1).
    """
    wmin = wg.amin(dim=-1).float().clamp(max=0) * alpha  # exact in wg's dtype: no float copy of wg needed
    wmax = wg.amax(dim=-1).float().clamp(min=0) * beta
    if spec.sym:
        scale, _ = full_range_scale(wmin, wmax, spec)
        scale = torch.where(scale.abs() < 1e-9, torch.full_like(scale, 1e-9), scale)
        zero = torch.full_like(scale, float(spec.sym_zero))
    else:
        scale = range_scale(wmin, wmax, spec)
        # zero >= 1: GPTQ v1 stores zero-1 in a nibble, so 0 is not representable there.
        zero = torch.round(-wmin / scale).clamp(1, spec.qmax)
    return scale, zero


def full_range_scale(
    wmin: torch.Tensor, wmax: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric "full range" scale per group from its (clipped) range ends wmin <= 0 <= wmax, unrounded,
    and whether the negative end set it: the signed end of larger magnitude maps onto -2**(bits-1)."""
    negative = -wmin >= wmax
    return torch.where(negative, wmin, wmax) / -spec.sym_zero, negative


def range_scale(wmin: torch.Tensor, wmax: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Asymmetric scale per group from its (clipped) range ends, unrounded: the range over qmax (at least 1e-9)."""
    return ((wmax - wmin) / spec.qmax).clamp(min=1e-9)


def quantize_with(
    w: torch.Tensor,
    spec: QuantSpec,
    scale: torch.Tensor,
    zero: torch.Tensor,
    offset: torch.Tensor | None = None,
) -> IntWeight:
    """Quantize w (N, K) with given per-group scale/zero (N, K // G) and an optional rounding offset (N, K)."""
    g = spec.group_size
    q = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    for r in row_chunks(*w.shape):  # float32 temporaries of a few MB, not of the whole weight
        x = group_view(w[r], g) / scale[r].unsqueeze(-1)
        if offset is not None:
            x = x + group_view(offset[r], g)
        x = torch.clamp(torch.round(x) + zero[r].unsqueeze(-1), 0, spec.qmax)
        q[r] = x.reshape(-1, w.shape[1]).to(torch.uint8)
    # The stored scale is fp16 in every format: quantize against that exact value.
    return IntWeight(
        q=q,
        scale=scale.float(),
        zero=zero.to(torch.uint8),
        group_size=g,
        bits=spec.bits,
    )


def kquant_fit(w: torch.Tensor, fit=None) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's Q4_K fit of w (N, K) as range factors (alpha, beta) per group of 32 (:func:`.kquant.fit_clip`;
    ``fit``: the group fit to use, the torch reference by default)."""
    parts = [fit_clip(group_view(w[r], SUB_BLOCK), fit) for r in row_chunks(*w.shape)]
    return torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])


def quantize_kquant(
    w: torch.Tensor, alpha: torch.Tensor | None = None, beta: torch.Tensor | None = None
) -> IntWeight:
    """w (N, K) in llama.cpp's Q4_K parameterization, each group of 32's range scaled by alpha / beta
    (N, K // 32); without them, llama.cpp's own fit (so that RTN here is llama.cpp's Q4_K)."""
    n, k = w.shape
    if alpha is None or beta is None:
        alpha, beta = kquant_fit(w)
    wmin = torch.empty(n, k // SUB_BLOCK, device=w.device)
    wmax = torch.empty_like(wmin)
    for r in row_chunks(n, k):
        wg = group_view(w[r], SUB_BLOCK)
        wmin[r], wmax[r] = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    scale, minimum, kq = kquant_scales(wmin, wmax, alpha, beta)
    q = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    for r in row_chunks(n, k):
        q[r] = kquant_codes(group_view(w[r], SUB_BLOCK), scale[r], minimum[r]).reshape(-1, k).to(torch.uint8)
    return IntWeight(q, scale, torch.zeros_like(kq.sc), SUB_BLOCK, 4, kq)


FP16_TINY = torch.finfo(torch.float16).tiny


def fp16_exact(scale: torch.Tensor) -> torch.Tensor:
    """Round scales to the fp16 values the formats store (sign kept, magnitude at least the smallest
    normal fp16), so that codes are chosen against the stored scale."""
    r = scale.to(torch.float16).float()
    return torch.where(r.abs() < FP16_TINY, torch.where(scale < 0, -FP16_TINY, FP16_TINY), r)
