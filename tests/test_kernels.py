"""hubtool's own int4 kernels: parity of every backend with ``reference``, dispatch, torch.compile, Triton.

Error bound (stated once, used everywhere): ``max|y - ref| <= TOL[dtype] * max|ref|`` where ref is the
``reference`` backend on the same layer and input. TOL is 2e-2 for bf16 (and for torch's built-in at any
dtype: it computes in bf16), 4e-3 for fp16 and 1e-4 for fp32 — a few output roundings of each dtype.
The first test run compiles the CPU kernel (about 25 s on this 2-core machine) into $HUBTOOL_CACHE or
~/.cache/hubtool; later runs load it from there (the whole file then takes about 30 s).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from hubtool.core.spec import QuantSpec
from hubtool.errors import HubtoolError
from hubtool.kernels import build_cpu_kernel, cpu, gpu, kernel_info
from hubtool.quant.rtn import quantize_rtn
from hubtool.runtime import Int4Linear, select_backend
from hubtool.runtime import backends as B

TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MS = (1, 3, 8, 33, 128)
# (N, K): N an odd multiple of 8, K several multiples of 128.
SHAPES = [(200, 384), (72, 128), (136, 640), (24, 256), (256, 512)]

needs_cpu_kernel = pytest.mark.skipif(not cpu.load(), reason="CPU kernel could not be built here")


def make_layer(n: int, k: int, sym: bool, seed: int, bias: bool = True, group_size: int = 128) -> Int4Linear:
    """A random Int4Linear built through quantize_rtn and from_int_weight."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    iw = quantize_rtn(w, QuantSpec(sym=sym, group_size=group_size))
    b = torch.randn(n, generator=g) if bias else None
    return Int4Linear.from_int_weight(iw, b, torch.bfloat16)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max|y - ref| / max|ref|."""
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()


def run(layer: Int4Linear, x: torch.Tensor, backend: str) -> torch.Tensor:
    """layer(x) through one named backend (no fallback)."""
    be = B.get_backend(backend)
    assert be.supports(layer, x), backend
    return be.matmul(x, be.prepare(layer, x.device), layer)


def test_signed_scales_and_zeros_are_exercised():
    """The layers the parity tests use have negative scales, and asym ones have zeros other than 8."""
    from hubtool.core import packing

    iw = packing.unpack(make_layer(200, 384, sym=True, seed=0).packed_tensors())
    assert (iw.scale < 0).any() and (iw.scale > 0).any()
    assert (iw.zero == 8).all()
    iwa = packing.unpack(make_layer(200, 384, sym=False, seed=0).packed_tensors())
    assert (iwa.zero != 8).any()


@needs_cpu_kernel
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sym", [True, False])
def test_cpu_backends_match_reference(shape, sym):
    """hubtool (auto ISA) and torch vs reference, all M and dtypes."""
    n, k = shape
    layer = make_layer(n, k, sym, seed=n + k)
    gen = torch.Generator().manual_seed(1)
    for m in MS:
        for dt in DTYPES:
            x = torch.randn(m, k, generator=gen).to(dt)
            ref = run(layer, x, "reference")
            y = run(layer, x, "hubtool")
            assert y.dtype == dt and y.shape == (m, n)
            assert rel_err(y, ref) <= TOL[dt], (m, dt, rel_err(y, ref))
            if B.get_backend("torch").supports(layer, x):  # N % 16 == 0 only
                assert rel_err(run(layer, x, "torch"), ref) <= TOL[torch.bfloat16], (m, dt, "torch")


@needs_cpu_kernel
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512_bf16"])
def test_every_cpu_isa_path_matches_reference(isa, monkeypatch):
    """Each ISA level this CPU has (forced through $HUBTOOL_CPU_ISA) gives the same answers."""
    if cpu.ISA_CODES[isa] > cpu.ISA_CODES[cpu.detected_isa()]:
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv(cpu.ISA_ENV, isa)
    gen = torch.Generator().manual_seed(2)
    for (n, k), sym in [((200, 384), True), ((136, 640), False)]:
        layer = make_layer(n, k, sym, seed=7)
        for m in (1, 5, 33):
            for dt in DTYPES:
                x = torch.randn(m, k, generator=gen).to(dt)
                assert rel_err(run(layer, x, "hubtool"), run(layer, x, "reference")) <= TOL[dt], (m, dt)


def int16_activations(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x as the int16 path sees it: per (row, group) codes round(x * 32767 / absmax) times absmax / 32767."""
    xg = x.float().reshape(x.shape[0], -1, group_size)
    scale = xg.abs().amax(-1, keepdim=True) / 32767
    codes = torch.where(scale > 0, torch.round(xg / scale.clamp_min(1e-38)), torch.zeros_like(xg))
    return (codes * scale).reshape(x.shape)


@needs_cpu_kernel
@pytest.mark.parametrize("dt", [torch.float16, torch.float32])
@pytest.mark.parametrize("sym", [True, False])
def test_cpu_int16_activation_path(dt, sym):
    """fp16/fp32 activations (default "int16" mode): exactly the product of the int16-coded activations.

    Bound: per value |x - x^| <= absmax(group) / 65534, so |y - y_exact| <= sum_k |w_k| absmax_g / 65534;
    the result must equal the fp64 product with x^ up to fp32 accumulation, and stay within that bound
    of the exact product even with a 1000x outlier in the row. "exact" mode must be closer still.
    """
    if not cpu.has_vnni() or cpu.detected_isa() != "avx512_bf16":
        pytest.skip("the int16 path needs AVX512-BF16 and VNNI")
    layer = make_layer(136, 640, sym, seed=11, bias=False)
    w = layer.dequantize(torch.float64)
    gen = torch.Generator().manual_seed(5)
    for m in (1, 3, 8, 33):
        x = torch.randn(m, 640, generator=gen)
        x[0, 5] = 1000.0  # an outlier: its group's other values lose precision, within the bound
        x = x.to(dt)
        y = run(layer, x, "hubtool").double()
        xq = int16_activations(x, 128).double()
        on_codes = xq @ w.t()
        out_round = (2.0**-10 if dt == torch.float16 else 2.0**-20) * on_codes.abs()  # y's own rounding
        assert ((y - on_codes).abs() <= out_round + 1e-5 * on_codes.abs().max()).all(), m
        exact = x.double() @ w.t()
        amax = x.double().abs().reshape(m, -1, 128).amax(-1).repeat_interleave(128, dim=1)
        bound = (amax / 65534) @ w.abs().t()  # sum_k |w_k| absmax_g / 65534, per output
        out_round = (2.0**-10 if dt == torch.float16 else 2.0**-20) * exact.abs()
        assert ((y - exact).abs() <= bound + out_round + 1e-6).all(), m
        y_exact = cpu.int4_mm(x, B.get_backend("hubtool").prepare(layer, x.device), act="exact").double()
        assert (y_exact - exact).abs().max() <= (y - exact).abs().max() + out_round.max() + 1e-6


@needs_cpu_kernel
@pytest.mark.parametrize("group_size", [32, 64])
def test_cpu_kernel_other_group_sizes(group_size):
    """Group sizes 32 and 64 (the spec allows them) through the same kernel."""
    layer = make_layer(72, 256, sym=False, seed=3, group_size=group_size)
    x = torch.randn(9, 256, dtype=torch.bfloat16)
    assert rel_err(run(layer, x, "hubtool"), run(layer, x, "reference")) <= TOL[torch.bfloat16]


@needs_cpu_kernel
def test_layer_forward_3d_input_and_bias():
    """Int4Linear.forward: batch dims, bias, auto picks hubtool on the CPU."""
    layer = make_layer(200, 384, sym=True, seed=4)
    x = torch.randn(2, 5, 384, dtype=torch.bfloat16)
    y = layer(x)
    assert layer.last_backend == "hubtool" and y.shape == (2, 5, 200)
    ref = run(layer, x.reshape(-1, 384), "reference") + layer.bias
    assert rel_err(y.reshape(-1, 200), ref) <= TOL[torch.bfloat16]


@needs_cpu_kernel
@pytest.mark.parametrize("forced", ["reference", "torch", "hubtool"])
def test_hubtool_kernel_env_forces_backend(forced, monkeypatch):
    """HUBTOOL_KERNEL=<name> makes every call use that backend; unset, auto uses ours first."""
    layer = make_layer(128, 256, sym=True, seed=5)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    monkeypatch.setenv(B.ENV_VAR, forced)
    layer(x)
    assert layer.last_backend == forced
    monkeypatch.delenv(B.ENV_VAR)
    assert B.AUTO_ORDER[0] == "hubtool"
    for m in (1, 8, 32, 128):
        for dt in DTYPES:
            assert select_backend(layer, torch.randn(m, 256).to(dt)).name == "hubtool"


def test_hubtool_backend_rejects_act_order():
    """A non-trivial g_idx (act-order) is not for our kernels: auto falls back."""
    layer = make_layer(72, 256, sym=True, seed=6)
    layer.g_idx = torch.randperm(256).int() // 128
    layer._trivial = None
    assert not B.get_backend("hubtool").supports(layer, torch.randn(1, 256))


@needs_cpu_kernel
def test_torch_compile_uses_custom_op():
    """The custom op traces (fake impl) under torch.compile, whole graph and through the layer."""
    layer = make_layer(136, 640, sym=False, seed=8)
    p = B.get_backend("hubtool").prepare(layer, torch.device("cpu"))
    x = torch.randn(4, 640, dtype=torch.bfloat16)

    def f(x):
        return torch.ops.hubtool.int4_mm_cpu(x, p.packed, p.scales, p.zeros, p.group_size, p.n, -1) * 2

    torch._dynamo.reset()
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(got, f(x))
    compiled = torch.compile(layer, backend="aot_eager")
    assert rel_err(compiled(x), layer(x)) <= 1e-6
    torch._dynamo.reset()


@needs_cpu_kernel
def test_torch_compile_inductor():
    """Inductor (which compiles C++ for the surrounding ops) keeps the custom op as an extern call."""
    layer = make_layer(72, 256, sym=True, seed=9)
    p = B.get_backend("hubtool").prepare(layer, torch.device("cpu"))

    def f(x):
        y = torch.ops.hubtool.int4_mm_cpu(x, p.packed, p.scales, p.zeros, p.group_size, p.n, -1)
        return torch.nn.functional.silu(y) + 1

    torch._dynamo.reset()
    x = torch.randn(2, 256, dtype=torch.float32)
    assert rel_err(torch.compile(f, fullgraph=True)(x), f(x)) <= 1e-5
    torch._dynamo.reset()


def test_build_failure_falls_back_with_one_warning(monkeypatch, caplog, tmp_path):
    """No compiler: load() is False, one warning line, and auto dispatch uses torch's built-in."""
    from torch.utils import cpp_extension

    saved = dict(cpu._state)
    monkeypatch.setenv("HUBTOOL_CACHE", str(tmp_path))

    def boom(*a, **k):
        raise RuntimeError("Error building extension 'hubtool_int4_cpu'\nc++: command not found")

    monkeypatch.setattr(cpp_extension, "load", boom)
    cpu._state.update(loaded=None, error=None)
    try:
        with caplog.at_level(logging.WARNING, logger="hubtool.kernels.cpu"):
            layer = make_layer(128, 256, sym=True, seed=10)
            for _ in range(3):
                layer(torch.randn(2, 256, dtype=torch.bfloat16))
                assert layer.last_backend == "torch"
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
        assert kernel_info()["cpu"]["fallback"] == "torch"
        with pytest.raises(HubtoolError, match="could not be built"):
            build_cpu_kernel()  # the explicit build (hubtool kernels build) fails loudly
    finally:
        cpu._state.clear()
        cpu._state.update(saved)


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    """The build folder is <HUBTOOL_CACHE>/kernels/<hash of source + torch version + flags>."""
    monkeypatch.setenv("HUBTOOL_CACHE", str(tmp_path))
    d = cpu.build_dir()
    assert d.parent == tmp_path / "kernels" and d.name == cpu.source_hash()


@needs_cpu_kernel
def test_kernel_info_reports_isa_and_dir():
    """describe_kernels() says what hubtool env shows: availability, ISA, build folder, auto order."""
    info = B.describe_kernels()
    assert info["cpu"]["available"] and info["cpu"]["isa"] in cpu.ISA_CODES
    assert info["cpu"]["build_dir"].endswith(cpu.source_hash())
    assert any(cpu.build_dir().glob("*.so"))  # still the folder the loaded library came from
    assert info["auto_order"][0] == "hubtool"
    assert {k: info[k] for k in ("cpu", "gpu")} == kernel_info()  # the kernels' own part, from floor 1
    json.dumps(info)


TRITON_SCRIPT = textwrap.dedent(
    """
    import json, torch
    from hubtool.core import packing
    from hubtool.kernels.gpu import triton_int4 as T
    from hubtool.quant.rtn import quantize_rtn
    from hubtool.core.spec import QuantSpec
    assert T.interpreting() and T.available()
    torch.manual_seed(0)
    out = []
    for (n, k, g, sym) in [(72, 256, 128, True), (40, 128, 32, False)]:
        iw = quantize_rtn(torch.randn(n, k) * 0.05, QuantSpec(sym=sym, group_size=g))
        t = packing.pack(iw)
        p = T.prepare(t.qweight, iw.zero.t(), t.scales, g, torch.device("cpu"))
        w = iw.dequantize()
        for m in (1, 3, 8, 33):
            for dt in (torch.bfloat16, torch.float16, torch.float32):
                x = torch.randn(m, k).to(dt)
                ref = x.float() @ w.t()
                for path in ("auto", "splitk", "tiled", "dequant"):
                    y = T.int4_mm(x, p, path)
                    assert y.dtype == dt and y.shape == (m, n)
                    err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                    out.append([n, k, g, sym, m, str(dt), path, err])
    f = torch.compile(lambda x: T.int4_mm(x, p) + 1, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 128)
    assert torch.allclose(f(x), T.int4_mm(x, p) + 1)
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.skipif(not gpu.HAVE_TRITON, reason="triton not installed")
def test_triton_kernels_under_interpreter():
    """All three Triton paths (split-K, tiled, dequant+matmul) run on the CPU with TRITON_INTERPRET=1."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout.split("RESULT ", 1)[1])
    tol = {"torch.bfloat16": 2e-2, "torch.float16": 4e-3, "torch.float32": 1e-4}
    # The dequant path rounds the weight to x's dtype first, exactly like the reference backend does.
    bad = [row for row in rows if row[-1] > tol[row[5]] * (1 if row[6] != "dequant" else 2)]
    assert not bad, bad


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("sym", [True, False])
def test_gpu_backend_matches_reference(sym):
    """On CUDA: hubtool (Triton: auto and every path) vs reference computed on the CPU."""
    from hubtool.kernels.gpu import triton_int4 as T

    layer = make_layer(4104, 1024, sym, seed=11)
    gpu_layer = make_layer(4104, 1024, sym, seed=11).cuda()
    p = B.get_backend("hubtool").prepare(gpu_layer, torch.device("cuda"))
    for m in (1, 3, 8, 16, 33, 128, 300):
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            x = torch.randn(m, 1024).to(dt)
            ref = run(layer, x, "reference")
            xc = x.cuda()
            y = run(gpu_layer, xc, "hubtool").cpu()
            assert y.dtype == dt and rel_err(y, ref) <= TOL[dt], (m, dt)
            for path in ("splitk", "tiled", "dequant"):
                got = T.int4_mm(xc, p, path).cpu()
                assert rel_err(got, ref) <= TOL[dt] * (2 if path == "dequant" else 1), (m, dt, path)


@pytest.mark.gpu
@cuda
def test_gpu_cuda_graph_and_compile():
    """The Triton op captures into a CUDA graph and compiles under torch.compile."""
    layer = make_layer(4096, 4096, sym=True, seed=12).cuda()
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    y0 = layer(x)
    assert layer.last_backend == "hubtool"
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        layer(x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(y, y0) <= 1e-2
    assert rel_err(torch.compile(layer)(x), y0) <= 1e-2


@needs_cpu_kernel
def test_bench_kernels_smoke(monkeypatch, tmp_path):
    """bench_kernels.run on a tiny shape: every column, ratios, targets, JSON and the table (no timing asserted)."""
    from hubtool import bench_kernels as bk

    monkeypatch.setattr(bk, "llc_bytes", lambda: 1 << 20)
    out = tmp_path / "k.json"
    res = bk.run(str(out), shapes=((128, 256),), ms=(1, 8), rounds=1, min_s=0.0, threads=1)
    assert json.loads(out.read_text())["cpu"][0]["shape"] == [128, 256]
    row = res["cpu"][0]
    assert {"bf16_matmul", "fp32_matmul", "torch_int4", "ours_bf16", "ours_fp16", "ours_fp32"} <= set(
        row["times_ms"]
    )
    assert row["dram_read_gbps"] > 0 and "vs_torch_int4" in row["ratios"]
    assert set(res["targets"]) >= {"m1_vs_torch_int4", "m8_vs_bf16"}
    assert "M=1 GB/s" in bk.format_table(res)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="no C++ compiler")
def test_kernel_library_builds_where_a_compiler_is():
    """With a compiler, a build error is a failure here, not every kernel test skipped in silence."""
    assert cpu.load(), cpu.status().get("error")
    for op in (
        "int4_mm_cpu",
        "signround_fwd",
        "signround_bwd_i32",
        "quantize_cols_i8",
        "gated_act_fwd",
        "rope",
    ):
        assert hasattr(torch.ops.hubtool, op), op


@needs_cpu_kernel
def test_env_and_kernels_build_commands(capsys):
    """`hubtool env --json` shows the backends, auto's choice and the kernels; `hubtool kernels build` the library."""
    from hubtool.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["env", "--json"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    info = json.loads(out)
    assert info["backends"] == ["reference", "torch", "hubtool"]
    assert set(info["auto_backend"].values()) == {"hubtool"}
    assert info["kernels"]["auto_order"] == ["hubtool", "torch", "reference"]
    assert info["kernels"]["cpu"]["available"] and info["libraries"]["torch"] == torch.__version__
    with pytest.raises(SystemExit) as exc:
        main(["kernels", "build"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert out.replace("\n", "").endswith(cpu.status()["path"]) and os.path.isfile(cpu.status()["path"])
