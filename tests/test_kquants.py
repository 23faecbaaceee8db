"""K-quant bytes (Q4_K packing, Q5_K/Q6_K quantization) checked against the gguf package's dequantizer."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from hubtool.formats import kquants
from hubtool.formats.kquants import dequantize, q4_k_bytes, q4_k_unpack, quantize_q5_k, quantize_q6_k

# rel-RMSE measured on _weights() (seed 0): Q6_K 0.0272, Q5_K 0.0451 (llama.cpp's own bytes: 0.0272, 0.0451),
# plain 4-bit RTN 0.141
Q6_K_REL_RMSE = 0.03
Q5_K_REL_RMSE = 0.05


def _weights(n: int = 64, k: int = 1024, seed: int = 0) -> torch.Tensor:
    """Gaussian bf16-exact weights with 0.2% outliers 20x larger, as in a trained linear."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[torch.rand(n, k, generator=g) < 0.002] *= 20
    return w.to(torch.bfloat16).float()


def _rel_rmse(approx: torch.Tensor, w: torch.Tensor) -> float:
    return float(((approx - w).square().mean() / w.square().mean()).sqrt())


def _rtn4(w: torch.Tensor) -> torch.Tensor:
    """Plain symmetric 4-bit RTN in groups of 32 (Q4_0's rule), dequantized."""
    g = w.reshape(-1, 32)
    d = g.abs().amax(-1, keepdim=True) / 7
    return ((g / d).round().clamp(-8, 7) * d).reshape(w.shape)


def _q4_k_params(n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    sc = torch.randint(0, 64, (n, k // 32), generator=g, dtype=torch.uint8)
    m = torch.randint(0, 64, (n, k // 32), generator=g, dtype=torch.uint8)
    q[0, :32], q[0, 32:64], sc[0, :2], m[0, :2], sc[1, -2:], m[1, -2:] = 0, 15, 63, 0, 0, 63
    d = (torch.rand(n, k // 256, generator=g) * 1e-3).half()
    dmin = (torch.rand(n, k // 256, generator=g) * 1e-2).half()
    d[0, 0], dmin[0, 0] = 0, 0
    return q, d, dmin, sc, m


def test_q4_k_bytes_dequantize_to_the_given_parameters():
    """gguf's Q4_K dequantizer reads d * sc * q - dmin * m back from the bytes, edge values included."""
    n, k = 8, 1024
    q, d, dmin, sc, m = _q4_k_params(n, k)
    data = q4_k_bytes(q, d, dmin, sc, m)
    assert data.shape == (n, k // 256 * 144) and data.dtype == np.uint8
    dense = dequantize(data, "Q4_K", k)
    ds = (d.float().repeat_interleave(8, 1) * sc.float()).repeat_interleave(32, 1)
    dm = (dmin.float().repeat_interleave(8, 1) * m.float()).repeat_interleave(32, 1)
    want = ds * q.float() - dm
    assert torch.equal(dense, want)  # the same float32 operations: exact
    assert float((dense - want).abs().max()) <= 1e-6 * float(want.abs().max())


def test_q4_k_round_trip_is_bit_exact():
    """unpack(pack(x)) == x, and pack(unpack(b)) == b for any bytes (12 scale bytes hold 16 x 6 bits)."""
    n, k = 4, 512
    params = _q4_k_params(n, k, seed=1)
    for got, want in zip(q4_k_unpack(q4_k_bytes(*params), k), params, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    raw = np.random.default_rng(0).integers(0, 256, (n, k // 256 * 144), dtype=np.uint8)
    raw[:, 0:4] = np.frombuffer(np.float16([1e-3, 2e-3]).tobytes(), np.uint8)  # finite d / dmin
    assert np.array_equal(q4_k_bytes(*q4_k_unpack(raw, k)), raw)


def test_q4_k_code_lands_at_its_index():
    """A lone q=15 at a known index dequantizes to the max at that index (catches a nibble-order slip)."""
    n, k = 1, 512
    for at in (0, 31, 32, 63, 64, 100, 200, 255, 300, 511):
        q = torch.zeros(n, k, dtype=torch.uint8)
        q[0, at] = 15
        d = torch.full((n, 2), 0.5, dtype=torch.float16)
        ones = torch.ones(n, k // 32, dtype=torch.uint8)
        dense = dequantize(q4_k_bytes(q, d, torch.zeros_like(d), ones, ones), "Q4_K", k)
        assert int(dense.argmax()) == at and float(dense.max()) == 7.5 and int((dense != 0).sum()) == 1


def test_shapes_and_ranges_are_checked():
    q, d, dmin, sc, m = _q4_k_params(2, 256)
    with pytest.raises(ValueError, match="multiple of 256"):
        q4_k_bytes(q[:, :128], d, dmin, sc[:, :4], m[:, :4])
    with pytest.raises(ValueError, match="shape"):
        q4_k_bytes(q, d, dmin, sc[:, :4], m)
    with pytest.raises(ValueError, match="0..63"):
        q4_k_bytes(q, d, dmin, sc + 64, m)
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_q6_k(torch.zeros(2, 100))
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_q5_k(torch.zeros(2, 300))
    with pytest.raises(ValueError, match="multiple of 256"):
        q4_k_unpack(np.zeros((1, 144), np.uint8), 100)


def test_q6_k_and_q5_k_error_on_par_with_llama_cpp():
    """Round-trip error through gguf's dequantizer: Q6_K < Q5_K < plain 4-bit RTN, each under its bound."""
    w = _weights()
    k = w.shape[1]
    b6, b5 = quantize_q6_k(w), quantize_q5_k(w)
    assert b6.shape == (w.shape[0], k // 256 * 210) and b5.shape == (w.shape[0], k // 256 * 176)
    e6, e5 = _rel_rmse(dequantize(b6, "Q6_K", k), w), _rel_rmse(dequantize(b5, "Q5_K", k), w)
    e4 = _rel_rmse(_rtn4(w), w)
    assert e6 < Q6_K_REL_RMSE and e5 < Q5_K_REL_RMSE
    assert e6 < 0.7 * e5 and e5 < 0.5 * e4


@pytest.mark.parametrize("kind", ["Q6_K", "Q5_K"])
def test_a_lone_large_weight_lands_at_its_index(kind):
    """One large value per row at a known index (every position class of the layouts) stays the max there."""
    fn = quantize_q6_k if kind == "Q6_K" else quantize_q5_k
    k = 512
    at = torch.tensor([0, 15, 16, 31, 32, 63, 64, 95, 96, 127, 128, 160, 200, 255, 256, 300, 383, 400, 511])
    w = _weights(len(at), k, seed=2) * 0.1
    w[torch.arange(len(at)), at] = 1.0
    dense = dequantize(fn(w), kind, k)
    assert torch.equal(dense.argmax(-1), at)
    assert float((dense[torch.arange(len(at)), at] - 1).abs().max()) < 0.02


@pytest.mark.parametrize("kind", ["Q6_K", "Q5_K"])
def test_zeros_and_chunking(kind, monkeypatch):
    """Zero rows come back zero; the bytes do not depend on the row chunk; bf16 in gives f32's bytes."""
    fn = quantize_q6_k if kind == "Q6_K" else quantize_q5_k
    w = _weights(16, 512, seed=3)
    w[3] = 0
    whole = fn(w)
    assert torch.equal(dequantize(whole, kind, 512)[3], torch.zeros(512))
    if kind == "Q6_K":
        assert not whole[3].any()  # llama.cpp writes an all-zero block for a block of zeros
    monkeypatch.setattr(kquants, "_CHUNK", 1024)  # two rows a chunk
    assert np.array_equal(fn(w.to(torch.bfloat16)), whole)


def _ggml_base() -> ctypes.CDLL:
    from hubtool.stages.verify_gguf import llama_cpp_env, llama_cpp_home

    home = llama_cpp_home()
    if home is None:
        pytest.skip("llama.cpp is not installed (make llama-cpp builds it into the hubtool cache)")
    bin_dir = llama_cpp_env(home).get("LLAMA_CPP_BIN", str(home / "build" / "bin"))
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        try:
            lib = ctypes.CDLL(f"{bin_dir}/{name}")
        except OSError:
            continue
        fn = lib.ggml_quantize_chunk
        fn.restype = ctypes.c_size_t
        fn.argtypes = (
            [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
        )
        return lib
    pytest.skip(f"no libggml-base in {bin_dir}")


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "ggml_type", "block_bytes"), [("Q6_K", 14, 210), ("Q5_K", 13, 176)])
def test_matches_llama_cpp_quantizer(kind, ggml_type, block_bytes):
    """Against llama.cpp's own ggml_quantize_chunk (no imatrix: quantize_row_qN_K_ref): same error within
    1%, and most blocks byte-identical (sums run in another order, so a rare tie goes the other way)."""
    lib = _ggml_base()
    w = _weights(128, 1024, seed=4)
    x = np.ascontiguousarray(w.numpy())
    ref = np.zeros((w.shape[0], w.shape[1] // 256 * block_bytes), np.uint8)
    lib.ggml_quantize_chunk(ggml_type, x.ctypes.data, ref.ctypes.data, 0, w.shape[0], w.shape[1], None)
    mine = (quantize_q6_k if kind == "Q6_K" else quantize_q5_k)(w)
    e_ref = _rel_rmse(dequantize(ref, kind, w.shape[1]), w)
    e_mine = _rel_rmse(dequantize(mine, kind, w.shape[1]), w)
    assert abs(e_mine - e_ref) < 0.01 * e_ref
    same = (mine.reshape(-1, block_bytes) == ref.reshape(-1, block_bytes)).all(-1).mean()
    assert same > 0.8


def test_cpp_group_fits_are_the_torch_ones():
    """The C++ fits (kernels/cpu/kquant_fit.cpp) compute llama.cpp's fits as the torch reference does: the
    same codes but for float sums in another order, and Q6_K/Q5_K bytes nearly all identical."""
    from hubtool.core.kquant import Q4_K_FIT, fit_scale_min
    from hubtool.formats.kquants import _make_qx_quants
    from hubtool.kernels import cpu

    if not cpu.load():
        pytest.skip("CPU kernel library unavailable")
    torch.manual_seed(5)
    x = torch.randn(4096, 32) * 0.02
    x[::97, 3] *= 25  # outliers
    x[7] = 0.0  # a flat group
    s_t, m_t, c_t = fit_scale_min(x, *Q4_K_FIT)
    s_c, m_c, c_c = cpu.fit_scale_min(x, *Q4_K_FIT)
    assert (c_t == c_c).all(-1).float().mean() > 0.99
    same = (c_t == c_c).all(-1)
    torch.testing.assert_close(s_c[same], s_t[same], rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(m_c[same], m_t[same], rtol=1e-4, atol=1e-9)
    y = x.reshape(-1, 16)
    s_t, c_t = _make_qx_quants(y, 32)
    s_c, c_c = cpu.fit_scale_sym(y, 32)
    assert (c_t == c_c).all(-1).float().mean() > 0.95  # measured 0.977: near-ties of the 19 grids
    w = torch.randn(64, 512) * 0.05
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HUBTOOL_TORCH_KQUANT_FIT", "1")
        ref6, ref5 = quantize_q6_k(w), quantize_q5_k(w)
    fast6, fast5 = quantize_q6_k(w), quantize_q5_k(w)
    # a block of 256 holds 16 (Q6_K) or 8 (Q5_K) fits: measured 94.5% / 83% of blocks identical
    assert (ref6.reshape(-1, 210) == fast6.reshape(-1, 210)).all(-1).mean() > 0.85
    assert (ref5.reshape(-1, 176) == fast5.reshape(-1, 176)).all(-1).mean() > 0.7
    for ref, fast, kind in ((ref6, fast6, "Q6_K"), (ref5, fast5, "Q5_K")):
        e_ref = (dequantize(ref, kind, 512) - w).norm() / w.norm()
        e_fast = (dequantize(fast, kind, 512) - w).norm() / w.norm()
        assert abs(e_fast - e_ref) < 0.005 * e_ref, kind  # the same error (measured: 5 digits alike)
