"""GPTQ v1 int4 packing, shared by the auto_round, auto_gptq and hubtool formats.

``qweight`` int32 (K/8, N): nibble j (LSB first) of row r holds input row 8r+j.
``qzeros`` int32 (K/G, N/8): packed along N, each nibble holds zero-1 (0x77777777 for symmetric int4).
``scales`` fp16 (K/G, N).  Dequantized: ``W[k, n] = scales[g, n] * (q[k, n] - (qzeros[g, n] + 1))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .intweight import IntWeight

PACK = 8  # int4 values per int32
_SHIFTS = torch.arange(
    0, 32, 4, dtype=torch.int32, device="cpu"
)  # explicit: safe under a meta-device context


def _pack_rows(x: torch.Tensor) -> torch.Tensor:
    """Pack uint4 values (R, C) along rows into int32 (R/8, C)."""
    r, c = x.shape
    x = x.to(torch.int32).reshape(r // PACK, PACK, c)
    return (x << _SHIFTS.to(x.device).view(1, PACK, 1)).sum(dim=1, dtype=torch.int32)


def _unpack_rows(p: torch.Tensor) -> torch.Tensor:
    """Unpack int32 (R/8, C) into uint8 (R, C)."""
    r8, c = p.shape
    x = (p.unsqueeze(1) >> _SHIFTS.to(p.device).view(1, PACK, 1)) & 0xF
    return x.reshape(r8 * PACK, c).to(torch.uint8)


@dataclass
class GPTQTensors:
    """The packed tensors of one linear layer in GPTQ v1 layout."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor | None = None

    def as_dict(self, prefix: str, with_g_idx: bool) -> dict[str, torch.Tensor]:
        """Tensors keyed as they appear in a checkpoint under ``prefix``."""
        out = {
            f"{prefix}.qweight": self.qweight,
            f"{prefix}.qzeros": self.qzeros,
            f"{prefix}.scales": self.scales,
        }
        if with_g_idx:
            k = self.qweight.shape[0] * PACK
            g = k // self.scales.shape[0]
            out[f"{prefix}.g_idx"] = self.g_idx if self.g_idx is not None else default_g_idx(k, g)
        return out


def default_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """The trivial group index (no act-order): k // G."""
    return torch.arange(in_features, dtype=torch.int32) // group_size


def pack(w: IntWeight) -> GPTQTensors:
    """Pack an IntWeight into GPTQ v1 tensors (bit-exact with auto-round's export of the same codes)."""
    if w.bits != 4:
        raise ValueError("only int4 packs into GPTQ v1 here")
    n, k = w.shape
    if k % PACK or n % PACK:
        raise ValueError(f"a ({n}, {k}) weight cannot be packed: both sides must be multiples of {PACK}")
    qweight = pack_codes(w.q)
    zeros = (w.zero.to(torch.int32) - 1).clamp(min=0).t().contiguous()  # (K/G, N), GPTQ v1 stores zero-1
    qzeros = _pack_rows(zeros.t().contiguous()).t().contiguous()  # pack along N
    scales = w.scale.t().contiguous().to(torch.float16)
    return GPTQTensors(qweight=qweight, qzeros=qzeros, scales=scales)


def pack_codes(q: torch.Tensor) -> torch.Tensor:
    """GPTQ v1 ``qweight`` int32 (K/8, N) of codes q (N, K) in [0, 15]."""
    return _pack_rows(q.t().contiguous())


def unpack(t: GPTQTensors) -> IntWeight:
    """Unpack GPTQ v1 tensors into codes, scales and zero points (g_idx must be the trivial one)."""
    q = _unpack_rows(t.qweight).t().contiguous()  # (N, K)
    zeros = _unpack_rows(t.qzeros.t().contiguous()).t().to(torch.int32) + 1  # (K/G, N)
    n, k = q.shape
    group_size = k // t.scales.shape[0]
    return IntWeight(
        q=q,
        scale=t.scales.t().float().contiguous(),
        zero=zeros.t().contiguous().to(torch.uint8),
        group_size=group_size,
    )


def has_trivial_g_idx(g_idx: torch.Tensor | None, group_size: int) -> bool:
    """True when g_idx is absent or equal to k // G (no act-order permutation)."""
    if g_idx is None:
        return True
    return torch.equal(g_idx.to(torch.int64), default_g_idx(g_idx.numel(), group_size).to(torch.int64))


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dense (N, K) weight from GPTQ v1 tensors, honouring an arbitrary g_idx (act-order)."""
    q = _unpack_rows(qweight).to(torch.float32)  # (K, N)
    zeros = _unpack_rows(qzeros.t().contiguous()).t().to(torch.float32) + 1  # (K/G, N)
    k = q.shape[0]
    if g_idx is None:
        g_idx = default_g_idx(k, k // scales.shape[0])
    gi = g_idx.long().to(q.device)
    w = (q - zeros[gi]) * scales.float()[gi]
    return w.t().contiguous().to(dtype)
