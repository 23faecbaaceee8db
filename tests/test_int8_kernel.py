"""hubtool's small-M int8-weight kernel (``hubtool::int8_mm_cpu``): y = (x @ q^T) * scale[None, :] + bias.

Error bound of the kernel, per output value, against the exact result for the same numbers (fp64)::

    |y - ref| <= u_out * |ref| + (K + 2) * 2^-23 * S,    S = scale_n * sum_k |x_k q_nk| + |b_n|

The codes are integers of at most 8 bits, so every product x_k q_nk is exact in fp32 for bf16 and fp16 x (at
most 8 + 11 significant bits) and rounds once for fp32 x; the K-term fp32 sum errs by at most about
K * 2^-24 * S in any order, the scale and the bias add one fp32 rounding each, and the result is rounded
once to x's dtype: u_out = 2^-8 (bf16), 2^-11 (fp16), 2^-24 (fp32), the unit roundoff of each. The bound
is tight: with bf16/fp16 outputs the final rounding alone takes some values close to it (asserted).
"""

from __future__ import annotations

import pytest
import torch

from hubtool.kernels import cpu

needs_cpu_kernel = pytest.mark.skipif(not cpu.load(), reason="CPU kernel could not be built here")

U_OUT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# (N, K): K not a multiple of 16 or 32 (200, 1000), a head's K (640), K below one vector (7, 33); N not a
# multiple of the tile of rows (8 or 4)
SHAPES = [(37, 200), (13, 640), (70, 1000), (9, 33), (5, 7)]
MS = (1, 2, 3, 4, 7)


def random_head(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes -127..127 (both ends present) and per-row scales spread over four decades."""
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    q[0, 0], q[-1, -1] = -127, 127
    scale = 10.0 ** (torch.rand(n, generator=gen) * 4 - 3)
    return q, scale


def reference(x, q, scale, b) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact result in fp64 and S = scale_n * sum_k |x_k q_nk| + |b_n|."""
    xd, qd, sd = x.double(), q.double(), scale.double()
    ref = (xd @ qd.t()) * sd
    s = (xd.abs() @ qd.abs().t()) * sd
    if b is not None:
        ref = ref + b.double()
        s = s + b.double().abs()
    return ref, s


def bound_ratio(y, x, q, scale, b) -> float:
    """The largest |y - ref| / bound over the output (the module's bound: <= 1 passes)."""
    ref, s = reference(x, q, scale, b)
    bound = U_OUT[x.dtype] * ref.abs() + (x.shape[1] + 2) * 2.0**-23 * s + 1e-30
    return ((y.double() - ref).abs() / bound).max().item()


def isa_levels() -> list[str]:
    """The ISA levels this CPU runs (the kernel's scalar level always)."""
    if not cpu.load():
        return ["scalar"]
    best = cpu.ISA_CODES[cpu.detected_isa()]
    return [name for name, code in cpu.ISA_CODES.items() if code <= best]


@needs_cpu_kernel
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512_bf16"])
def test_int8_kernel_matches_the_exact_product(isa):
    """Every ISA level (the isa argument), x in bf16/fp16/fp32, M = 1..4 and 7, odd N and K, bias or not."""
    if isa not in isa_levels():
        pytest.skip(f"this CPU has no {isa}")
    level = cpu.ISA_CODES[isa]
    gen = torch.Generator().manual_seed(0)
    worst = dict.fromkeys(X_DTYPES, 0.0)
    for n, k in SHAPES:
        q, scale = random_head(n, k, gen)
        for x_dtype in X_DTYPES:
            for m in MS:
                x = torch.randn(m, k, generator=gen).to(x_dtype)
                for b in (None, torch.randn(n, generator=gen).to(x_dtype)):
                    y = cpu.int8_mm(x, q, scale, b, isa=level)
                    assert y.dtype == x_dtype and y.shape == (m, n)
                    ratio = bound_ratio(y, x, q, scale, b)
                    assert ratio <= 1.0, (n, k, x_dtype, m, b is not None, ratio)
                    worst[x_dtype] = max(worst[x_dtype], ratio)
    # the bound is not loose: the final rounding to bf16 / fp16 alone comes near it
    assert worst[torch.bfloat16] > 0.3 and worst[torch.float16] > 0.3, worst


@needs_cpu_kernel
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_int8_fp32_is_the_float64_product_with_each_rows_scale(isa):
    """fp32 x: the result is the fp64 one to 1e-5 (fp32 accumulation, no 16-bit step), and each output
    column carries its own row's scale: the same product with the scales shifted by one row is far off."""
    if isa not in isa_levels():
        pytest.skip(f"this CPU has no {isa}")
    gen = torch.Generator().manual_seed(2)
    for n, k in ((300, 640), (129, 1000)):
        q, scale = random_head(n, k, gen)
        x = torch.randn(4, k, generator=gen)
        b = torch.randn(n, generator=gen)
        y = cpu.int8_mm(x, q, scale, b, isa=cpu.ISA_CODES[isa]).double()
        ref, s = reference(x, q, scale, b)
        assert ((y - ref).norm() / ref.norm()).item() <= 1e-5
        assert ((y - ref).abs() / s).max().item() <= 1e-6
        shifted, _ = reference(x, q, scale.roll(1), b)
        assert ((shifted - y).norm() / ref.norm()).item() > 0.1


@needs_cpu_kernel
def test_int8_kernel_any_m_strided_rows_bias_dtypes_and_empty():
    """Larger M (several tiles of 4 rows of x), codes whose rows are strided (read in place), a bias in
    another float dtype, the isa=None default, and M = 0, N = 0, K = 0."""
    gen = torch.Generator().manual_seed(1)
    big = torch.randint(-127, 128, (70, 300), dtype=torch.int8, generator=gen)
    q = big[:, :259]  # rows of 259 codes, 300 apart
    assert not q.is_contiguous()
    scale = torch.rand(70, generator=gen) * 0.02
    for m in (9, 33):
        x = torch.randn(m, 259, generator=gen).to(torch.bfloat16)
        b32 = torch.randn(70, generator=gen)  # fp32 bias for bf16 x
        assert bound_ratio(cpu.int8_mm(x, q, scale, b32), x, q, scale, b32) <= 1.0
    x = torch.randn(2, 259, generator=gen).to(torch.float16)
    assert cpu.int8_mm(torch.empty(0, 259, dtype=torch.float16), q, scale).shape == (0, 70)
    assert cpu.int8_mm(x, q[:0], scale[:0]).shape == (2, 0)
    b = torch.randn(70, generator=gen).to(torch.float16)
    y = cpu.int8_mm(torch.empty(2, 0, dtype=torch.float16), q[:, :0], scale, b)
    assert torch.equal(y, b.expand(2, 70))
    assert torch.equal(cpu.int8_mm(torch.empty(2, 0), q[:, :0], scale), torch.zeros(2, 70))


@needs_cpu_kernel
def test_int8_kernel_rejects_bad_inputs():
    """Codes that are not int8, mismatched K or scale length, a column-strided q, an ISA the CPU lacks."""
    x = torch.randn(1, 64)
    q = torch.zeros(8, 64, dtype=torch.int8)
    scale = torch.ones(8)
    for args in (
        (x, q.to(torch.uint8), scale),
        (x, q[:, :32], scale),
        (x, q, scale[:4]),
        (x[:, :32], q.t().contiguous().t()[:, :32], scale),
    ):
        with pytest.raises(RuntimeError):
            torch.ops.hubtool.int8_mm_cpu(*args)
    if cpu.detected_isa() != "avx512_bf16":
        with pytest.raises(RuntimeError, match="ISA level"):
            torch.ops.hubtool.int8_mm_cpu(x, q, scale, None, 3)


@needs_cpu_kernel
def test_int8_kernel_fake_for_torch_compile():
    """The fake implementation: meta tensors give (M, N) in x's dtype, and torch.library.opcheck passes."""
    q = torch.randint(-127, 128, (24, 40), dtype=torch.int8)
    scale = torch.rand(24)
    for dt in X_DTYPES:
        y = torch.ops.hubtool.int8_mm_cpu(
            torch.empty(3, 40, dtype=dt, device="meta"), q.to("meta"), scale.to("meta")
        )
        assert y.is_meta and y.shape == (3, 24) and y.dtype == dt
    x = torch.randn(3, 40).to(torch.bfloat16)
    b = torch.randn(24).to(torch.bfloat16)
    torch.library.opcheck(torch.ops.hubtool.int8_mm_cpu.default, (x, q, scale, b, -1))
