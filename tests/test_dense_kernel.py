"""hubtool's small-M dense kernel (``hubtool::dense_mm_cpu``) and the 16-bit linears routed to it.

Error bound of the kernel (stated once, used everywhere), per output value, against the exact product of
the same bf16/fp16/fp32 numbers (computed in fp64)::

    |y - ref| <= u_out * |ref| + (K + 2) * 2^-23 * S,    S = sum_k |x_k w_k| + |b|

Every product is exact in fp32 (bf16 x bf16 has 16 significant bits; the FMA paths round once per
multiply-add), the K-term sum in fp32 errs by at most about K * 2^-24 * S in any order (doubled here for
vdpbf16ps, which rounds after each of its two products), the bias adds one fp32 rounding, and the result is
rounded once to x's dtype: u_out = 2^-8 (bf16), 2^-11 (fp16), 2^-24 (fp32), half an ulp each.
A loaded model's logits through the kernel and through torch's bf16 matmul both round nearly the same fp32
sum to bf16: they differ by at most one bf16 ulp, bounded here by 2^-7 * max |logit|.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hubtool.kernels import cpu
from hubtool.runtime import dense as D
from hubtool.runtime.loader import load_quantized
from tests.test_formats import exported

needs_cpu_kernel = pytest.mark.skipif(not cpu.load(), reason="CPU kernel could not be built here")

U_OUT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
# (N, K): odd N and K, K below one vector, K with a tail, a head-like K
SHAPES = [(37, 77), (9, 33), (130, 1000), (64, 640), (3, 5)]


def check_bound(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> float:
    """Assert the module's bound for y = x w^T + b; return the largest |y - ref| / bound seen."""
    xd, wd = x.double(), w.double()
    ref = xd @ wd.t()
    s = xd.abs() @ wd.abs().t()
    if b is not None:
        ref = ref + b.double()
        s = s + b.double().abs()
    k = x.shape[1]
    bound = U_OUT[x.dtype] * ref.abs() + (k + 2) * 2.0**-23 * s + 1e-30
    ratio = ((y.double() - ref).abs() / bound).max().item()
    assert ratio <= 1.0, ratio
    return ratio


@needs_cpu_kernel
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512_bf16"])
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float16])
def test_dense_kernel_matches_the_exact_product(isa, w_dtype, monkeypatch):
    """Every ISA level (forced through $HUBTOOL_CPU_ISA), M = 1..8, odd N and K, bias or not, x in every dtype."""
    if cpu.ISA_CODES[isa] > cpu.ISA_CODES[cpu.detected_isa()]:
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv(cpu.ISA_ENV, isa)
    gen = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        w = torch.randn(n, k, generator=gen).to(w_dtype)
        for m in range(1, 9):
            for x_dtype in (torch.bfloat16, torch.float16, torch.float32):
                x = torch.randn(m, k, generator=gen).to(x_dtype)
                for b in (None, torch.randn(n, generator=gen).to(w_dtype)):
                    y = cpu.dense_mm(x, w, b)
                    assert y.dtype == x_dtype and y.shape == (m, n)
                    check_bound(y, x, w, b)


@needs_cpu_kernel
def test_dense_kernel_any_m_strided_rows_and_empty():
    """Larger M is still right; a weight whose rows are strided is read in place; M = 0 and K = 0 work."""
    gen = torch.Generator().manual_seed(1)
    big = torch.randn(70, 300, generator=gen).to(torch.bfloat16)
    w = big[:, :259]  # rows of 259 values, 300 apart
    assert not w.is_contiguous()
    for m in (9, 33):
        x = torch.randn(m, 259, generator=gen).to(torch.bfloat16)
        check_bound(cpu.dense_mm(x, w), x, w, None)
    assert cpu.dense_mm(torch.empty(0, 259, dtype=torch.bfloat16), w).shape == (0, 70)
    b = torch.randn(4, dtype=torch.bfloat16)
    y = cpu.dense_mm(torch.empty(2, 0, dtype=torch.bfloat16), torch.empty(4, 0, dtype=torch.bfloat16), b)
    assert torch.equal(y, b.expand(2, 4))
    with pytest.raises(RuntimeError, match="rows must be contiguous"):
        cpu.dense_mm(torch.randn(1, 70, dtype=torch.bfloat16), big[:, :70].t())


@needs_cpu_kernel
def test_bf16_matches_torch_within_one_ulp():
    """Against torch's own bf16 matmul (what the layer replaced): at most one bf16 ulp apart."""
    gen = torch.Generator().manual_seed(2)
    w = (torch.randn(4099, 640, generator=gen) * 0.05).to(torch.bfloat16)
    for m in (1, 4, 8):
        x = torch.randn(m, 640, generator=gen).to(torch.bfloat16)
        ours, theirs = cpu.dense_mm(x, w).float(), F.linear(x, w).float()
        ulp = 2.0**-7 * torch.maximum(ours.abs(), theirs.abs())
        assert ((ours - theirs).abs() <= ulp + 1e-6).all()


def small_linear(dtype=torch.bfloat16, bias=True) -> nn.Linear:
    """A 16-bit nn.Linear with odd sizes."""
    torch.manual_seed(3)
    return nn.Linear(200, 77, bias=bias).to(dtype)


@needs_cpu_kernel
def test_dense_linear_dispatch(monkeypatch):
    """Small M without grad runs the kernel; larger M, grad, other dtypes, other devices and the policies run torch."""
    lin = small_linear()
    ref_layer = small_linear()
    assert D.use_dense_kernel(lin) == 1 and type(lin) is D.DenseLinear and isinstance(lin, nn.Linear)
    x = torch.randn(2, 2, 200, dtype=torch.bfloat16)  # M = 4 = MAX_M
    assert D.MAX_M == 4
    with torch.no_grad():
        y = lin(x)
        assert lin.last_backend == "hubtool" and y.shape == (2, 2, 77)
        check_bound(y.reshape(4, 77), x.reshape(4, 200), lin.weight, lin.bias)
        lin(torch.randn(5, 200, dtype=torch.bfloat16))  # M = 5 > MAX_M
        assert lin.last_backend == "torch"
        for env, value in (
            (D.ENV_VAR, "torch"),
            ("HUBTOOL_KERNEL", "reference"),
            ("HUBTOOL_KERNEL", "torch"),
        ):
            monkeypatch.setenv(env, value)
            assert torch.equal(lin(x), ref_layer(x)) and lin.last_backend == "torch", (env, value)
            monkeypatch.delenv(env)
        monkeypatch.setenv("HUBTOOL_KERNEL", "torch")
        monkeypatch.setenv(D.ENV_VAR, "hubtool")  # the dense setting wins
        lin(x)
        assert lin.last_backend == "hubtool"
        monkeypatch.delenv(D.ENV_VAR)
        monkeypatch.delenv("HUBTOOL_KERNEL")
        pinned = small_linear()
        D.use_dense_kernel(pinned, backend="reference")
        pinned(x)
        assert pinned.last_backend == "torch"
        with pytest.raises(RuntimeError):  # dtype mismatch: torch's own error, as before
            lin(x.float())
        meta = D.DenseLinear(200, 77, device="meta", dtype=torch.bfloat16)
        assert meta(torch.empty(1, 200, device="meta", dtype=torch.bfloat16)).is_meta
        assert meta.last_backend == "torch"
    lin(x)  # grad enabled and the weight requires grad: torch (the op has no backward)
    assert lin.last_backend == "torch"
    lin32 = small_linear(torch.float32)
    D.use_dense_kernel(lin32)
    with torch.no_grad():
        lin32(x.float())
    assert lin32.last_backend == "torch"


@needs_cpu_kernel
def test_dense_linear_keeps_state_moves_and_compiles(tmp_path):
    """State dict keys, .to(), restore and torch.compile (the op traces with its fake implementation)."""
    lin = small_linear()
    keys = set(lin.state_dict())
    D.use_dense_kernel(lin)
    assert set(lin.state_dict()) == keys
    torch.save(lin.state_dict(), tmp_path / "sd.pt")
    x = torch.randn(1, 200, dtype=torch.bfloat16)
    with torch.no_grad():
        eager = lin(x)
        torch._dynamo.reset()
        compiled = torch.compile(lin, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(x), eager)
        torch._dynamo.reset()
        lin.to(torch.float32)
        lin(x.float())
        assert lin.last_backend == "torch"
    assert D.restore_linears(lin) == 1 and type(lin) is nn.Linear and "last_backend" not in lin.__dict__


def test_falls_back_to_torch_when_the_library_cannot_load(monkeypatch):
    """No kernel library: the layer runs F.linear, bit for bit."""
    saved = dict(cpu._state)
    cpu._state.update(loaded=False, error="no compiler")
    try:
        lin, ref = small_linear(), small_linear()
        D.use_dense_kernel(lin)
        x = torch.randn(1, 200, dtype=torch.bfloat16)
        with torch.no_grad():
            assert torch.equal(lin(x), ref(x))
        assert lin.last_backend == "torch"
    finally:
        cpu._state.clear()
        cpu._state.update(saved)


@needs_cpu_kernel
def test_a_loaded_models_head_runs_the_kernel(tiny_models, tmp_path_factory):
    """hubtool.load and plain transformers: the lm_head is a DenseLinear that runs the kernel while
    generating, stays tied to the embedding (same storage), and its logits match the torch path."""
    from transformers import AutoConfig

    from hubtool.runtime.hf_quantizer import register
    from hubtool.source import auto_model_class

    ex = exported("gemma3", tiny_models("gemma3"), tmp_path_factory.mktemp("exports"))
    folder = ex.dirs["hubtool"]
    register()
    cls = auto_model_class(AutoConfig.from_pretrained(folder))
    tok = getattr(ex.loaded.processor, "tokenizer", ex.loaded.processor)
    ids = tok("The quick brown fox", return_tensors="pt")
    for model in (load_quantized(folder), cls.from_pretrained(folder)):
        head, emb = model.get_output_embeddings(), model.get_input_embeddings()
        assert type(head) is D.DenseLinear
        assert head.weight is emb.weight and head.weight.data_ptr() == emb.weight.data_ptr()
        with torch.no_grad():
            model.generate(**ids, max_new_tokens=3, do_sample=False)
            assert head.last_backend == "hubtool"
            step = {"input_ids": ids["input_ids"][:, -1:]}  # one token: M = 1
            ours = model(**step).logits.float()
            assert head.last_backend == "hubtool"
            head.dense_backend = "torch"
            theirs = model(**step).logits.float()
            assert head.last_backend == "torch"
            head.dense_backend = None
        assert (ours - theirs).abs().max().item() <= 2.0**-7 * theirs.abs().max().item()
        assert D.dense_backends(model) == {"lm_head": "torch"}
