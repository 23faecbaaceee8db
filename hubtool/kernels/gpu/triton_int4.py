"""Triton int4 kernels for CUDA, reading the GPTQ v1 layout directly (qweight int32 (K/8, N), fp16 scales).

Three paths, picked by the number of rows M:

* ``splitk`` (M <= SPLITK_M_MAX): each program owns BLOCK_N columns and a strided share of K (split-K),
  dequantizes its tile once and accumulates every row: a multiply-and-sum for M <= 4, ``tl.dot`` with
  rows padded to 16 above; partial sums meet in an fp32 buffer through atomic adds.
* ``tiled`` (M <= TILED_M_MAX): a classic tensor-core GEMM tile (BLOCK_M x BLOCK_N, K loop) with the
  int4 tile dequantized in registers before each ``tl.dot``.
* ``dequant`` (larger M): a Triton kernel writes the dense (K, N) weight in x's dtype, then cuBLAS.

Everything is registered as the custom op ``hubtool::int4_mm_triton`` (with a fake implementation, so it
works under ``torch.compile``). Importing this module never fails: without triton, ``HAVE_TRITON`` is False
and ``available()`` says so. With ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (tests); the
interpreter's bf16/fp16 ``tl.dot`` is wrong in triton 3.x, so there the dots run in fp32 (``DOT_FP32``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

try:  # triton is optional (the gpu / dev extras)
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # noqa: BLE001 - ImportError, or a broken install that fails at import
    triton = None
    tl = None
    HAVE_TRITON = False

SPLITK_M_MAX = 16  # at most this many rows: split-K kernel
TILED_M_MAX = 128  # at most this many rows: tensor-core tiled kernel; above: dequantize + cuBLAS
PATHS = {"auto": -1, "splitk": 0, "tiled": 1, "dequant": 2}


def interpreting() -> bool:
    """Whether triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false")


def available() -> bool:
    """Whether the Triton path can run here: triton importable and CUDA present (or the interpreter on)."""
    return HAVE_TRITON and (torch.cuda.is_available() or interpreting())


@dataclass
class TritonPacked:
    """A layer's weight for the Triton kernels: GPTQ qweight, fp16 scales, zero points when asymmetric."""

    qweight: torch.Tensor  # int32 (K/8, N)
    scales: torch.Tensor  # fp16 (K/G, N)
    zeros: torch.Tensor | None  # uint8 (K/G, N) holding z (1..16); None when symmetric (z = 8)
    group_size: int


def prepare(
    qweight: torch.Tensor, zero: torch.Tensor, scales: torch.Tensor, group_size: int, device: torch.device
) -> TritonPacked:
    """Move the GPTQ tensors to ``device``; ``zero`` is the unpacked zero point (K/G, N), 8 when symmetric."""
    zeros = None
    if not bool((zero == 8).all()):
        zeros = zero.to(device=device, dtype=torch.uint8).contiguous()
    return TritonPacked(
        qweight.to(device=device, dtype=torch.int32).contiguous(),
        scales.to(device=device, dtype=torch.float16).contiguous(),
        zeros,
        group_size,
    )


def _next_pow2(v: int) -> int:
    """Smallest power of two >= v."""
    return 1 << max(0, (int(v) - 1).bit_length())


def choose_path(m: int) -> int:
    """The path auto uses for M rows (0 splitk, 1 tiled, 2 dequant)."""
    if m <= SPLITK_M_MAX:
        return 0
    if m <= TILED_M_MAX:
        return 1
    return 2


if HAVE_TRITON:

    @triton.jit
    def _dequant_tile(
        qw_ptr,
        s_ptr,
        z_ptr,
        k0,
        offs_n,
        n_mask,
        N,
        G: tl.constexpr,
        BLOCK_K: tl.constexpr,
        HAS_ZERO: tl.constexpr,
    ):
        """Rows k0..k0+BLOCK_K of W^T (K, N) at columns offs_n, in fp32 (BLOCK_K divides G)."""
        offs_k = k0 + tl.arange(0, BLOCK_K)
        # Each int32 of qweight row k//8 holds 8 consecutive input rows (LSB first).
        qw = tl.load(qw_ptr + (offs_k[:, None] // 8) * N + offs_n[None, :], mask=n_mask[None, :], other=0)
        q = (qw >> ((offs_k[:, None] % 8) * 4)) & 0xF
        g = k0 // G
        s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=8).to(tl.float32)
        else:
            z = tl.zeros_like(s) + 8.0
        return (q.to(tl.float32) - z[None, :]) * s[None, :]

    @triton.jit
    def _splitk_kernel(
        x_ptr,
        qw_ptr,
        s_ptr,
        z_ptr,
        y_ptr,
        M,
        N,
        K,
        stride_xm,
        G: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,
        HAS_ZERO: tl.constexpr,
        USE_DOT: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):
        """Small M: program (n-tile, k-split) accumulates all rows, then atomically adds into fp32 y."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
            w = _dequant_tile(qw_ptr, s_ptr, z_ptr, k0, offs_n, n_mask, N, G, BLOCK_K, HAS_ZERO)
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None], other=0.0
            )
            if USE_DOT:
                if DOT_FP32:
                    acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
                else:
                    acc += tl.dot(x, w.to(x.dtype))
            else:
                acc += tl.sum(x.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)
        tl.atomic_add(
            y_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=m_mask[:, None] & n_mask[None, :]
        )

    @triton.jit
    def _tiled_kernel(
        x_ptr,
        qw_ptr,
        s_ptr,
        z_ptr,
        y_ptr,
        M,
        N,
        K,
        stride_xm,
        G: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        HAS_ZERO: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):
        """Medium M: one (BLOCK_M, BLOCK_N) output tile per program, int4 tile dequantized before each dot."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w = _dequant_tile(qw_ptr, s_ptr, z_ptr, k0, offs_n, n_mask, N, G, BLOCK_K, HAS_ZERO)
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None], other=0.0
            )
            if DOT_FP32:
                acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(x, w.to(x.dtype))
        out = acc.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], out, mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _dequant_kernel(
        qw_ptr,
        s_ptr,
        z_ptr,
        w_ptr,
        N,
        G: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        HAS_ZERO: tl.constexpr,
    ):
        """Large M: write the dense W^T (K, N) in w's dtype, for cuBLAS."""
        pid_k = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        k0 = pid_k * BLOCK_K
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, k0, offs_n, n_mask, N, G, BLOCK_K, HAS_ZERO)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        tl.store(
            w_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(w_ptr.dtype.element_ty), mask=n_mask[None, :]
        )


def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the device (a small number in the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def _block_k(group_size: int, want: int) -> int:
    """The largest power of two <= want that divides the group size (at least 16 for tl.dot)."""
    bk = want
    while bk > 16 and group_size % bk:
        bk //= 2
    if group_size % bk:
        raise ValueError(f"group size {group_size} is not a multiple of 16")
    return bk


def _run_splitk(x, qweight, scales, zeros, group_size, dot_fp32):
    m, k = x.shape
    n = qweight.shape[1]
    use_dot = m > 4
    if use_dot:
        block_m, block_n, block_k = 16, 64, _block_k(group_size, 64)
    else:
        block_m = _next_pow2(m)
        block_n = 128 if m == 1 else 64
        block_k = _block_k(group_size, 64 if m <= 2 else 32)
    n_tiles = triton.cdiv(n, block_n)
    k_iters = k // block_k
    split = max(1, min(k_iters, _next_pow2(triton.cdiv(4 * _num_sms(x.device), n_tiles))))
    if x.device.type != "cuda":
        split = min(split, 2)
    y = torch.zeros((m, n), device=x.device, dtype=torch.float32)
    z_arg = zeros if zeros is not None else scales
    _splitk_kernel[(n_tiles, split, triton.cdiv(m, block_m))](
        x, qweight, scales, z_arg, y, m, n, k, x.stride(0),
        G=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split,
        HAS_ZERO=zeros is not None, USE_DOT=use_dot, DOT_FP32=dot_fp32,
    )  # fmt: skip
    return y.to(x.dtype)


def _run_tiled(x, qweight, scales, zeros, group_size, dot_fp32):
    m, k = x.shape
    n = qweight.shape[1]
    block_m = 32 if m <= 32 else 64
    block_n, block_k = 64, _block_k(group_size, 64)
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    z_arg = zeros if zeros is not None else scales
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _tiled_kernel[grid](
        x, qweight, scales, z_arg, y, m, n, k, x.stride(0),
        G=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        HAS_ZERO=zeros is not None, DOT_FP32=dot_fp32,
    )  # fmt: skip
    return y


def dequantize(qweight, scales, zeros, group_size, dtype) -> torch.Tensor:
    """The dense (K, N) weight W^T in ``dtype`` (one Triton kernel)."""
    k = qweight.shape[0] * 8
    n = qweight.shape[1]
    block_n, block_k = 64, _block_k(group_size, 64)
    w = torch.empty((k, n), device=qweight.device, dtype=dtype)
    z_arg = zeros if zeros is not None else scales
    grid = (k // block_k, triton.cdiv(n, block_n))
    _dequant_kernel[grid](
        qweight, scales, z_arg, w, n,
        G=group_size, BLOCK_N=block_n, BLOCK_K=block_k, HAS_ZERO=zeros is not None,
    )  # fmt: skip
    return w


def _int4_mm_impl(x, qweight, scales, zeros, group_size, path):
    """Dispatch to the split-K, tiled or dequantize+cuBLAS path (path -1: by M)."""
    if not HAVE_TRITON:
        raise RuntimeError("hubtool::int4_mm_triton needs triton")
    x = x.contiguous()
    dot_fp32 = x.dtype == torch.float32 or interpreting()
    p = choose_path(x.shape[0]) if path < 0 else path
    if p == 0:
        return _run_splitk(x, qweight, scales, zeros, group_size, dot_fp32)
    if p == 1:
        return _run_tiled(x, qweight, scales, zeros, group_size, dot_fp32)
    w = dequantize(qweight, scales, zeros, group_size, x.dtype)
    return x @ w


_SCHEMA = "(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, int group_size, int path) -> Tensor"
int4_mm_op = None
if HAVE_TRITON:
    int4_mm_op = torch.library.custom_op("hubtool::int4_mm_triton", mutates_args=(), schema=_SCHEMA)(
        _int4_mm_impl
    )

    @int4_mm_op.register_fake
    def _(x, qweight, scales, zeros, group_size, path):
        return x.new_empty((x.shape[0], qweight.shape[1]))


def int4_mm(x: torch.Tensor, p: TritonPacked, path: str = "auto") -> torch.Tensor:
    """(M, K) activations times the int4 weight -> (M, N) in x's dtype, through the custom op."""
    if int4_mm_op is None:
        raise RuntimeError("triton is not installed")
    return torch.ops.hubtool.int4_mm_triton(x, p.qweight, p.scales, p.zeros, p.group_size, PATHS[path])
