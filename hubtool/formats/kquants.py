"""llama.cpp's K-quant blocks (Q4_K, Q5_K, Q6_K) as bytes, vectorized over every block of a tensor.

A K-quant super-block covers 256 weights of a row. Q4_K and Q5_K split it into 8 sub-blocks of 32 with
``W = d * sc * q - dmin * m``: fp16 ``d`` and ``dmin``, then 12 bytes of 6-bit ``sc`` / ``m`` (bytes 0..3
hold ``sc[0..3]``, bytes 4..7 ``m[0..3]``, each with the top 2 bits of ``sc[4..7]`` / ``m[4..7]`` in bits
6..7; bytes 8..11 hold the low nibbles of ``sc[4..7]`` | ``m[4..7] << 4``), then the codes: in each
64-weight chunk, byte ``l`` is ``q[l] | q[32 + l] << 4``. Q4_K is 144 bytes; Q5_K (176 bytes) puts 32
bytes ``qh`` before the 128 nibble bytes, bit ``s`` of ``qh[l]`` the fifth bit of weight ``32 s + l``.
Q6_K (210 bytes) splits it into 16 sub-blocks of 16 with ``W = d * sc * (q - 32)``: 128 bytes of low
nibbles (per 128-weight half, bytes ``l`` / ``32 + l`` hold weights ``l`` / ``32 + l`` low and
``64 + l`` / ``96 + l`` high), 64 bytes of top 2 bits (``qh[l]`` bits ``2 t`` of weight ``32 t + l``),
16 int8 scales, fp16 ``d``.

``q4_k_bytes`` packs parameters hubtool tuned itself; ``quantize_q5_k`` / ``quantize_q6_k`` are
round-to-nearest from float weights after llama.cpp's ``quantize_row_q5_K_ref`` (``make_qkx2_quants``)
and ``quantize_row_q6_K_ref`` (``make_qx_quants``), for the tensors llama.cpp's Q4_K_M mix keeps at higher
precision. Sums run in a different order than llama.cpp's, so a rare code may differ at a tie; the error
is llama.cpp's. Rows go in chunks so float32 temporaries stay at tens of MB, on the weight's device.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..core.kquant import fit_scale_min

QK_K = 256
Q4_K_BYTES = 144
Q5_K_BYTES = 176
Q6_K_BYTES = 210
_CHUNK = 1 << 20  # weights per chunk: each float32 temporary is 4 MiB
_EPS = 1e-15  # llama.cpp's GROUP_MAX_EPS
TORCH_FIT_ENV = "HUBTOOL_TORCH_KQUANT_FIT"  # "1": the torch group fits even where the C++ ones run


def _blocks(k: int) -> int:
    if k % QK_K:
        raise ValueError(f"K-quants need rows of a multiple of {QK_K} weights, got K={k}")
    return k // QK_K


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.uint8)


def _f16_bytes(t: torch.Tensor) -> torch.Tensor:
    """(..., ) float16 -> (..., 2) uint8, little-endian."""
    return t.to(torch.float16).contiguous().view(torch.uint8).reshape(*t.shape, 2)


def _pack_scales(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(..., 8) 6-bit scales and mins -> (..., 12) bytes (llama.cpp's get_scale_min_k4 layout)."""
    sc, m = _u8(sc), _u8(m)
    lo = torch.cat([sc[..., :4] | ((sc[..., 4:] >> 4) << 6), m[..., :4] | ((m[..., 4:] >> 4) << 6)], dim=-1)
    return torch.cat([lo, (sc[..., 4:] & 0xF) | ((m[..., 4:] & 0xF) << 4)], dim=-1)


def _unpack_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., 12) bytes -> 6-bit scales and mins, each (..., 8)."""
    sc = torch.cat([b[..., 0:4] & 63, (b[..., 8:12] & 0xF) | ((b[..., 0:4] >> 6) << 4)], dim=-1)
    m = torch.cat([b[..., 4:8] & 63, (b[..., 8:12] >> 4) | ((b[..., 4:8] >> 6) << 4)], dim=-1)
    return sc, m


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(..., 256) codes -> (..., 128) bytes of their low nibbles, llama.cpp's Q4_K/Q5_K order."""
    q = _u8(q).reshape(*q.shape[:-1], 4, 2, 32) & 0xF
    return (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(*q.shape[:-3], 128)


def _unpack_nibbles(b: torch.Tensor) -> torch.Tensor:
    """(..., 128) bytes -> (..., 256) 4-bit codes."""
    b = b.reshape(*b.shape[:-1], 4, 1, 32)
    return torch.cat([b & 0xF, b >> 4], dim=-2).reshape(*b.shape[:-3], 256)


def _k4_blocks(q: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor, sc: torch.Tensor, m: torch.Tensor):
    n, k = q.shape
    nb = _blocks(k)
    want = {"d": (d, (n, nb)), "dmin": (dmin, (n, nb)), "sc": (sc, (n, k // 32)), "m": (m, (n, k // 32))}
    for name, (t, shape) in want.items():
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{name} must have shape {shape} for codes of shape {(n, k)}, got {tuple(t.shape)}"
            )
    head = torch.cat(
        [
            _f16_bytes(d.cpu()),
            _f16_bytes(dmin.cpu()),
            _pack_scales(sc.cpu().reshape(n, nb, 8), m.cpu().reshape(n, nb, 8)),
        ],
        dim=-1,
    )
    return head, _u8(q.cpu()).reshape(n, nb, QK_K)


def q4_k_bytes(
    q: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor, sc: torch.Tensor, m: torch.Tensor
) -> np.ndarray:
    """Q4_K bytes (N, K / 256 * 144) of codes q (N, K) 0..15, fp16 d/dmin (N, K/256), 6-bit sc/m (N, K/32)."""
    head, q = _k4_blocks(q, d, dmin, sc, m)
    if int(q.max()) > 15 or int(_u8(sc).max()) > 63 or int(_u8(m).max()) > 63:
        raise ValueError("Q4_K codes must be 0..15 and its sub-block scales and mins 0..63")
    return torch.cat([head, _pack_nibbles(q)], dim=-1).reshape(q.shape[0], -1).numpy()


def q4_k_unpack(
    data: np.ndarray, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, d, dmin, sc, m) of Q4_K bytes: the exact inverse of :func:`q4_k_bytes`."""
    nb = _blocks(k)
    b = torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8)).reshape(-1, nb, Q4_K_BYTES)
    n = b.shape[0]
    d = b[..., 0:2].contiguous().view(torch.float16).reshape(n, nb)
    dmin = b[..., 2:4].contiguous().view(torch.float16).reshape(n, nb)
    sc, m = _unpack_scales(b[..., 4:16])
    q = _unpack_nibbles(b[..., 16:])
    return q.reshape(n, k), d, dmin, sc.reshape(n, k // 32), m.reshape(n, k // 32)


def _q5_k_pack(
    q: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor, sc: torch.Tensor, m: torch.Tensor
) -> torch.Tensor:
    """Q5_K bytes (N, K / 256 * 176) of codes 0..31 and the parameters of :func:`q4_k_bytes`."""
    head, q = _k4_blocks(q, d, dmin, sc, m)
    bits = ((q >> 4) & 1).reshape(*q.shape[:-1], 8, 32) << torch.arange(8, dtype=torch.uint8)[:, None]
    qh = bits.sum(dim=-2, dtype=torch.uint8)
    return torch.cat([head, qh, _pack_nibbles(q)], dim=-1).reshape(q.shape[0], -1)


def _q6_k_pack(q: torch.Tensor, sc: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Q6_K bytes (N, K / 256 * 210) of codes q (N, K) 0..63, int8 sc (N, K/16), fp16 d (N, K/256)."""
    n, k = q.shape
    nb = _blocks(k)
    q = _u8(q.cpu()).reshape(n, nb, 2, 4, 32)  # half, quarter t, lane l
    ql = (q[:, :, :, 0:2] & 0xF) | ((q[:, :, :, 2:4] & 0xF) << 4)  # bytes l and 32 + l of each half
    qh = ((q >> 4) << (2 * torch.arange(4, dtype=torch.uint8))[:, None]).sum(dim=-2, dtype=torch.uint8)
    scales = sc.cpu().to(torch.int8).reshape(n, nb, 16).view(torch.uint8)
    parts = [ql.reshape(n, nb, 128), qh.reshape(n, nb, 64), scales, _f16_bytes(d.cpu().reshape(n, nb))]
    return torch.cat(parts, dim=-1).reshape(n, -1)


def _nearest(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's nearest_int: round half to even, as int32."""
    return torch.round(x).to(torch.int32)


def _fit(x: torch.Tensor, nmax: int, *asym):
    """The group fit: C++ (``kernels.cpu``) on the CPU where it is built, else the torch reference;
    with ``asym`` = (rmin, rdelta, nstep) llama.cpp's make_qkx2_quants, without it make_qx_quants."""
    from ..kernels import cpu

    fast = x.device.type == "cpu" and os.environ.get(TORCH_FIT_ENV) != "1" and cpu.load()
    if asym:
        return (cpu.fit_scale_min if fast else fit_scale_min)(x, nmax, *asym)
    return (cpu.fit_scale_sym if fast else _make_qx_quants)(x, nmax)


def _make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, codes 0..2 nmax - 1) per row of x (G, n): make_qx_quants with rmse_type 1, no weights."""
    amax, at = x.abs().max(dim=-1, keepdim=True)
    big = x.gather(-1, at)  # the signed value of largest magnitude (first one on ties)
    zero = amax < _EPS
    big = torch.where(zero, torch.ones_like(big), big)
    w = x * x

    def trial(iscale: torch.Tensor):
        lf = torch.round(iscale * x).clamp_(-nmax, nmax - 1)
        wl = w * lf
        return lf, (wl * x).sum(-1, keepdim=True), (wl * lf).sum(-1, keepdim=True)

    best_l, sumlx, suml2 = trial(-nmax / big)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    f32 = np.float32
    for step in [s for s in range(-9, 10) if s]:
        lv, sumlx, suml2 = trial(-float(f32(nmax) + f32(0.1) * f32(step)) / big)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = sumlx / torch.where(better, suml2, torch.ones_like(suml2))
        best_l = torch.where(better, lv, best_l)
        scale = torch.where(better, new_scale, scale)
        best = torch.where(better, new_scale * sumlx, best)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    codes = torch.where(zero, torch.zeros_like(best_l), best_l + nmax)
    return scale.squeeze(-1), codes


def _q6_k_chunk(x: torch.Tensor) -> torch.Tensor:
    """Q6_K bytes of float32 rows x (n, K), as quantize_row_q6_K_ref."""
    n, k = x.shape
    nb = k // QK_K
    scales, codes = _fit(x.reshape(-1, 16), 32)
    scales = scales.reshape(n, nb, 16)
    absmax, at = scales.abs().max(dim=-1, keepdim=True)
    max_scale = scales.gather(-1, at)
    empty = absmax < _EPS
    iscale = -128.0 / torch.where(empty, torch.ones_like(max_scale), max_scale)
    d = (1.0 / iscale).to(torch.float16)
    sc = _nearest(iscale * scales).clamp_(max=127)  # >= -128 since max_scale has the largest magnitude
    ds = (d.float() * sc.float())[..., None]  # (n, nb, 16, 1)
    xs = x.reshape(n, nb, 16, 16)
    requant = _nearest(xs / torch.where(ds == 0, torch.ones_like(ds), ds)).clamp_(-32, 31) + 32
    codes = torch.where(ds == 0, codes.reshape(n, nb, 16, 16), requant)
    # llama.cpp writes an all-zero block for a super-block of (near) zeros
    codes = torch.where(empty[..., None], torch.zeros_like(codes), codes)
    sc = torch.where(empty, torch.zeros_like(sc), sc)
    d = torch.where(empty, torch.zeros_like(d), d)
    return _q6_k_pack(codes.reshape(n, k), sc.reshape(n, -1), d.reshape(n, nb))


def _q5_k_chunk(x: torch.Tensor) -> torch.Tensor:
    """Q5_K bytes of float32 rows x (n, K), as quantize_row_q5_K_ref."""
    n, k = x.shape
    nb = k // QK_K
    scales, mins, codes = _fit(x.reshape(-1, 32), 31, -0.5, 0.1, 15)
    scales, mins = scales.reshape(n, nb, 8), mins.reshape(n, nb, 8)
    max_scale = scales.max(dim=-1, keepdim=True).values.clamp(min=0.0)
    max_min = mins.max(dim=-1, keepdim=True).values.clamp(min=0.0)
    inv_scale = torch.where(max_scale > 0, 63.0 / max_scale, torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, 63.0 / max_min, torch.zeros_like(max_min))
    sc = (_nearest(inv_scale * scales) & 0xFF).clamp_(max=63)  # a uint8 in llama.cpp, then MIN(63, .)
    m = (_nearest(inv_min * mins) & 0xFF).clamp_(max=63)
    d = (max_scale / 63.0).to(torch.float16)
    dmin = (max_min / 63.0).to(torch.float16)
    ds = (d.float() * sc.float())[..., None]  # (n, nb, 8, 1)
    dm = (dmin.float() * m.float())[..., None]
    xs = x.reshape(n, nb, 8, 32)
    requant = _nearest((xs + dm) / torch.where(ds == 0, torch.ones_like(ds), ds)).clamp_(0, 31)
    codes = torch.where(ds == 0, codes.reshape(n, nb, 8, 32), requant)
    return _q5_k_pack(
        codes.reshape(n, k), d.reshape(n, nb), dmin.reshape(n, nb), sc.reshape(n, -1), m.reshape(n, -1)
    )


def _quantize(w: torch.Tensor, chunk_fn, block_bytes: int) -> np.ndarray:
    if w.dim() != 2:
        raise ValueError(f"K-quants take a 2-D weight (N, K), got shape {tuple(w.shape)}")
    n, k = w.shape
    nb = _blocks(k)
    out = np.empty((n, nb * block_bytes), dtype=np.uint8)
    rows = max(1, _CHUNK // k)
    with torch.no_grad():
        for start in range(0, n, rows):
            x = w[start : start + rows].to(torch.float32)
            out[start : start + rows] = chunk_fn(x).numpy()
    return out


def quantize_q6_k(w: torch.Tensor) -> np.ndarray:
    """Q6_K bytes (N, K / 256 * 210) of a float weight (N, K), as llama.cpp's quantize_row_q6_K_ref."""
    return _quantize(w, _q6_k_chunk, Q6_K_BYTES)


def quantize_q5_k(w: torch.Tensor) -> np.ndarray:
    """Q5_K bytes (N, K / 256 * 176) of a float weight (N, K), as llama.cpp's quantize_row_q5_K_ref."""
    return _quantize(w, _q5_k_chunk, Q5_K_BYTES)


def dequantize(data: np.ndarray, kind: str, k: int) -> torch.Tensor:
    """Dense float32 (N, K) of K-quant bytes (kind "Q4_K", "Q5_K" or "Q6_K") via the gguf package."""
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    dense = gguf.quants.dequantize(np.ascontiguousarray(data, dtype=np.uint8), qtype)
    return torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)).reshape(-1, k)
