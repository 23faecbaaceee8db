"""hubtool's CPU int4 kernel: build (cached), load, repack GPTQ tensors for it, and call it.

The C++ source (``int4_mm.cpp``) is compiled with ``torch.utils.cpp_extension`` at first use into
``$HUBTOOL_CACHE/kernels/<hash>`` (default ``~/.cache/hubtool``); the hash covers the source, the torch
version and the flags, so a new torch or a changed source rebuilds. The library registers the custom ops
``hubtool::int4_mm_cpu`` (with a fake implementation here, for ``torch.compile``), ``hubtool::int4_cpu_isa``
and ``hubtool::int4_cpu_has_vnni``; ``signround.cpp`` adds SignRound's fused fake quantization
(``hubtool::signround_fwd`` / ``signround_bwd``, used by :mod:`hubtool.quant.signround` on the CPU);
``dense_mm.cpp`` adds ``hubtool::dense_mm_cpu``, a small-M matmul by a bf16/fp16 weight read in place
(the 16-bit lm_head of an int4 model; :mod:`hubtool.runtime.dense` routes ``nn.Linear`` layers to it);
``int8_mm.cpp`` adds ``hubtool::int8_mm_cpu``, the same small-M stream over an int8 weight with one fp32
scale per output row (a quantized lm_head; :func:`int8_mm`).
If the build fails (no compiler, no ninja) ``load()`` returns False and logs one warning; callers then
use torch's built-in kernel (and SignRound its torch code).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ...cache import cache_root

log = logging.getLogger(__name__)

# one library: the int4 matmul, SignRound's fused step, the fused elementwise ops of block tuning, the
# small-M dense matmul of 16-bit weights, llama.cpp's K-quant scale fits, the small-M int8-weight matmul
SOURCES = tuple(
    Path(__file__).with_name(f"{n}.cpp")
    for n in ("int4_mm", "signround", "block_ops", "dense_mm", "kquant_fit", "int8_mm")
)
HEADERS = (Path(__file__).with_name("simd.h"),)  # included by the sources: part of the build's hash
EXT_NAME = "hubtool_int4_cpu"
CFLAGS = ("-O3", "-std=c++17", "-fopenmp", "-fno-math-errno")
LDFLAGS = ("-fopenmp",)
ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512", 3: "avx512_bf16"}
ISA_CODES = {v: k for k, v in ISA_NAMES.items()}
BLOCK_N = 64  # output columns per block of the repacked layout
# Force a lower ISA level (scalar|avx2|avx512|avx512_bf16), for tests and comparisons.
ISA_ENV = "HUBTOOL_CPU_ISA"
# fp16/fp32 activations: "int16" (default; on CPUs with AVX512-VNNI) turns each group of G values into
# int16 codes with one scale (error <= group absmax / 65534 per value) for bf16 speed; "exact" splits them
# into two bf16 parts, hi + lo (exact for fp16, ~2^-17 relative for fp32), at up to twice the multiply work;
# "bf16" rounds them to bf16 first, as torch's built-in does.
ACT_ENV = "HUBTOOL_CPU_ACT"
ACT_MODES = ("int16", "exact", "bf16")  # the op's act argument is the index; "bf16" converts x before it

_lock = threading.Lock()
_state: dict[str, object] = {"loaded": None, "error": None, "build_s": None, "path": None}


def source_hash() -> str:
    """Hash of what the binary depends on: the source, torch's version and the compiler flags."""
    h = hashlib.sha256()
    for src in SOURCES + HEADERS:
        h.update(src.read_bytes())
    h.update(torch.__version__.encode())
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    return h.hexdigest()[:16]


def build_dir() -> Path:
    """Where the compiled kernel lives: <cache>/kernels/<hash>."""
    return cache_root() / "kernels" / source_hash()


def load(verbose: bool = False) -> bool:
    """Build (first time) and load the kernel library; False, with one warning logged, if that fails."""
    if _state["loaded"] is not None:
        return bool(_state["loaded"])
    with _lock:
        if _state["loaded"] is not None:
            return bool(_state["loaded"])
        if os.environ.get("HUBTOOL_NO_CPU_KERNEL"):
            _state.update(loaded=False, error="disabled by HUBTOOL_NO_CPU_KERNEL")
            return False
        t0 = time.perf_counter()
        try:
            from torch.utils import cpp_extension

            out = build_dir()
            out.mkdir(parents=True, exist_ok=True)
            path = cpp_extension.load(
                name=EXT_NAME,
                sources=[str(src) for src in SOURCES],
                extra_cflags=list(CFLAGS),  # lists of their own: cpp_extension appends to them
                extra_ldflags=list(LDFLAGS),
                build_directory=str(out),
                verbose=verbose,
                is_python_module=False,
            )
            _register_fake()
        except Exception as exc:  # noqa: BLE001 - any build/load failure means "use the fallback"
            msg = str(exc).strip().splitlines()
            _state.update(loaded=False, error=msg[-1] if msg else type(exc).__name__)
            log.warning(
                "hubtool CPU int4 kernel unavailable (%s); using torch's built-in int4 kernel",
                _state["error"],
            )
            return False
        _state.update(loaded=True, build_s=time.perf_counter() - t0, path=str(path))
        log.debug("hubtool CPU int4 kernel loaded from %s in %.1f s", path, _state["build_s"])
        return True


def runs_on(device: torch.device) -> bool:
    """Whether these kernels serve tensors on ``device``: a CPU device, and the library built and loaded."""
    return device.type == "cpu" and load()


def status() -> dict:
    """What load() found: loaded, error, load/build seconds, library path."""
    return dict(_state)


_fake_registered = False


def _register_fake() -> None:
    """Shape-only implementations of hubtool::int4_mm_cpu, dense_mm_cpu and int8_mm_cpu for torch.compile."""
    global _fake_registered
    if _fake_registered:
        return

    @torch.library.register_fake("hubtool::int4_mm_cpu")
    def _fake(x, packed, scales, zeros, group_size, n, isa=-1, act=0):
        return x.new_empty((x.shape[0], n))

    @torch.library.register_fake("hubtool::dense_mm_cpu")
    def _fake_dense(x, w, bias=None, isa=-1):
        return x.new_empty((x.shape[0], w.shape[0]))

    @torch.library.register_fake("hubtool::int8_mm_cpu")
    def _fake_int8(x, q, scale, bias=None, isa=-1):
        return x.new_empty((x.shape[0], q.shape[0]))

    _fake_registered = True


def detected_isa() -> str:
    """The best ISA level this CPU supports, as the kernel sees it (needs the library loaded)."""
    return ISA_NAMES[int(torch.ops.hubtool.int4_cpu_isa())]


def has_vnni() -> bool:
    """Whether the CPU has AVX512-VNNI (the int16 path for fp16/fp32 activations needs it)."""
    return bool(torch.ops.hubtool.int4_cpu_has_vnni())


def forced_isa() -> int:
    """ISA level forced by $HUBTOOL_CPU_ISA, or -1 (auto)."""
    name = os.environ.get(ISA_ENV, "").strip().lower()
    return ISA_CODES.get(name, -1) if name else -1


@dataclass
class Packed:
    """A layer's weight in the kernel's layout: blocks of 64 columns, K/2 pairs of 64 bytes each."""

    packed: torch.Tensor  # uint8 (N/64, K/2, 64)
    scales: torch.Tensor  # fp16 (N/64, K/G, 64)
    zeros: torch.Tensor | None  # uint8 (N/64, K/G, 64), None when symmetric (z = 8)
    group_size: int
    n: int


def _byte_map() -> tuple[torch.Tensor, torch.Tensor]:
    """For tile r and word j (column j//2, row j%2): the byte of the 64 and the nibble (0 low, 1 high)."""
    r = torch.arange(4).view(4, 1)
    j = torch.arange(32).view(1, 32)
    byte = 16 * (j // 8) + (j % 8) + 8 * (r % 2)
    nib = (r // 2).expand(4, 32)
    return byte, nib


def repack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> Packed:
    """Repack codes q uint8 (N, K), scale (N, K/G) and zero uint8 (N, K/G) into the kernel layout."""
    n, k = q.shape
    if k % group_size or group_size % 2:
        raise ValueError(f"K={k} must be a multiple of an even group size ({group_size})")
    nb = -(-n // BLOCK_N)
    npad = nb * BLOCK_N
    ng = k // group_size
    qp = torch.zeros(npad, k, dtype=torch.int32)
    qp[:n] = q.to(torch.int32)
    # values[b, p, r, j] = q[64 b + 16 r + j // 2, 2 p + j % 2]
    v = qp.view(nb, 4, 16, k // 2, 2).permute(0, 3, 1, 2, 4).reshape(nb, k // 2, 4, 32)
    byte, nib = _byte_map()
    shifted = (v << (4 * nib).to(torch.int32)).reshape(nb, k // 2, 128)
    packed = torch.zeros(nb, k // 2, 64, dtype=torch.int32)
    packed.scatter_add_(2, byte.reshape(1, 1, 128).expand(nb, k // 2, 128), shifted)
    sc = torch.zeros(npad, ng, dtype=torch.float16)
    sc[:n] = scale.to(torch.float16)
    scales = sc.view(nb, BLOCK_N, ng).permute(0, 2, 1).contiguous()
    zeros = None
    if not bool((zero == 8).all()):
        zp = torch.full((npad, ng), 8, dtype=torch.uint8)
        zp[:n] = zero.to(torch.uint8)
        zeros = zp.view(nb, BLOCK_N, ng).permute(0, 2, 1).contiguous()
    return Packed(packed.to(torch.uint8).contiguous(), scales, zeros, group_size, n)


def unrepack(p: Packed) -> torch.Tensor:
    """The codes q uint8 (N, K) of a packed weight: the inverse of :func:`repack` for them."""
    nb, half, _ = p.packed.shape
    byte, nib = _byte_map()
    picked = p.packed.to(torch.int32).index_select(2, byte.reshape(128))  # (nb, K/2, 128)
    v = (picked >> (4 * nib).reshape(128).to(torch.int32)) & 0xF
    q = v.view(nb, half, 4, 16, 2).permute(0, 2, 3, 1, 4).reshape(nb * BLOCK_N, 2 * half)
    return q[: p.n].to(torch.uint8).contiguous()


def int4_mm(x: torch.Tensor, p: Packed, isa: int | None = None, act: str | None = None) -> torch.Tensor:
    """(M, K) activations times the packed weight -> (M, N) in x's dtype (the custom op)."""
    level = forced_isa() if isa is None else isa
    act = act or os.environ.get(ACT_ENV, "int16")
    if act not in ACT_MODES:
        raise ValueError(f"{ACT_ENV}={act!r}: use one of {', '.join(ACT_MODES)}")
    if act == "bf16" and x.dtype != torch.bfloat16:
        y = torch.ops.hubtool.int4_mm_cpu(
            x.to(torch.bfloat16), p.packed, p.scales, p.zeros, p.group_size, p.n, level
        )
        return y.to(x.dtype)
    return torch.ops.hubtool.int4_mm_cpu(
        x, p.packed, p.scales, p.zeros, p.group_size, p.n, level, ACT_MODES.index(act)
    )


DENSE_WEIGHT_DTYPES = (torch.bfloat16, torch.float16)
DENSE_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def dense_mm(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, isa: int | None = None
) -> torch.Tensor:
    """(M, K) x times a bf16/fp16 weight (N, K), read where it lies, plus bias -> (M, N) in x's dtype.

    Accumulates in fp32 (vdpbf16ps for bf16 x bf16 on AVX512-BF16, FMA on fp32 otherwise) and rounds once.
    Made for small M (a decode step); it computes any M, but from about M = 8 up torch's matmul is faster.
    """
    level = forced_isa() if isa is None else isa
    return torch.ops.hubtool.dense_mm_cpu(x, w, bias, level)


INT8_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def int8_mm(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    isa: int | None = None,
) -> torch.Tensor:
    """x (M, K) @ int8 codes q (N, K)^T (read in place) * scale (N,) + bias -> (M, N) in x's dtype."""
    level = forced_isa() if isa is None else isa
    return torch.ops.hubtool.int8_mm_cpu(x, q, scale, bias, level)


def fit_scale_min(
    x: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama.cpp's asymmetric group fit (make_qkx2_quants) of float32 groups x (G, n): (scale, -min, codes
    as float32), as :func:`hubtool.core.kquant.fit_scale_min` computes it, one C++ loop per group."""
    scale, neg_min, codes = torch.ops.hubtool.fit_scale_min(x.float().contiguous(), nmax, rmin, rdelta, nstep)
    return scale, neg_min, codes.float()


def fit_scale_sym(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's symmetric group fit (make_qx_quants, rmse_type 1) of float32 groups x (G, n): (scale,
    codes 0..2 nmax - 1 as float32)."""
    scale, codes = torch.ops.hubtool.fit_scale_sym(x.float().contiguous(), nmax)
    return scale, codes.float()


def in_memory_order(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """x permuted so that its rows (last dimension) come in memory order, contiguous (a permuted view
    costs no copy), and the permutation."""
    order = sorted(range(x.dim() - 1), key=lambda d: -x.stride(d)) + [x.dim() - 1]
    xp = x.permute(order)
    return (xp if xp.is_contiguous() else xp.contiguous()), order


def undo_order(y: torch.Tensor, order: list[int]) -> torch.Tensor:
    """y (computed in memory order) back in the original dimension order, with x's strides."""
    return y.permute(sorted(range(len(order)), key=order.__getitem__))


def rope_layout(x: torch.Tensor, cos: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int], list[int]]:
    """For x (B, H, L, D) and cos (B|1, L, D): x in memory order, the order, its three leading sizes and the
    strides of cos/sin rows over them (0 over the heads and a broadcast batch)."""
    xp, order = in_memory_order(x)
    cs = cos.unsqueeze(1).expand(x.shape[0], x.shape[1], -1, -1)
    return xp, order, list(xp.shape[:3]), [cs.stride(d) for d in order[:3]]


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin for x (B, H, L, D), cos/sin (B|1, L, D) contiguous, in one pass
    (``hubtool::rope``, each product and the sum rounded as torch's ops round them); x's strides kept."""
    xp, order, sizes, strides = rope_layout(x, cos)
    return undo_order(torch.ops.hubtool.rope(xp, cos, sin, sizes, strides, False), order)
