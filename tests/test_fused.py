"""The fused elementwise ops of block tuning compute the module's own function, forward and backward."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.nn import functional as F

from hubtool.kernels import cpu
from hubtool.quant.fused import GELU_TANH, SILU, activation_kind, cpu_fused_ops, gated_act

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not cpu.load(), reason="the CPU kernel library did not build"),
]

ACTS = {SILU: F.silu, GELU_TANH: lambda t: F.gelu(t, approximate="tanh")}


def _reference(gu: torch.Tensor, kind: int) -> torch.Tensor:
    gate, up = gu.chunk(2, dim=-1)
    return ACTS[kind](gate) * up


def _value_and_grad(fn, gu: torch.Tensor, dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = gu.clone().requires_grad_()
    out = fn(x)
    out.backward(dh.to(out.dtype))
    return out.detach().double(), x.grad.double()


def _err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((x - ref).abs() / (ref.abs() + 1e-2)).max())


@pytest.mark.parametrize("kind", [SILU, GELU_TANH])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gated_act_is_as_accurate_as_torch(kind, dtype):
    """Value and gradient against fp64: no further off than torch's own code in that dtype."""
    g = torch.Generator().manual_seed(kind)
    gu = (torch.randn(3, 37, 2 * 96, generator=g) * 3).to(dtype)  # 96: AVX-512 blocks; 37 rows: uneven split
    gu[0, 0, :8] = torch.tensor([0.0, -0.0, 30.0, -30.0, 90.0, -90.0, 1e-3, -1e-3])  # saturation, tiny
    dh = torch.randn(3, 37, 96, generator=g).to(dtype)
    ours = _value_and_grad(lambda t: gated_act(t, kind), gu, dh)
    torch_own = _value_and_grad(lambda t: _reference(t, kind), gu, dh)
    exact = _value_and_grad(lambda t: _reference(t, kind), gu.double(), dh)
    for x, t, e in zip(ours, torch_own, exact, strict=True):
        assert x.shape == e.shape
        assert _err(x, e) <= 1.5 * _err(t, e) + 1e-6, (_err(x, e), _err(t, e))
    if dtype == torch.bfloat16:  # torch's formulas and roundings: nearly every value the same
        assert (ours[0] == torch_own[0]).double().mean() > 0.99
        assert (ours[1] == torch_own[1]).double().mean() > 0.95


def test_activation_kind_is_exact_or_none():
    from transformers.activations import ACT2FN

    assert activation_kind(ACT2FN["silu"]) == SILU
    assert activation_kind(ACT2FN["gelu_pytorch_tanh"]) == GELU_TANH
    assert (
        activation_kind(ACT2FN["gelu_python_tanh"]) is None
    )  # tanh formula in Python: not the same rounding
    assert activation_kind(ACT2FN["gelu"]) is None
    assert activation_kind(ACT2FN["relu"]) is None


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_block_mlp_is_fused_in_tuning_and_gives_the_same_gradients(tiny_models, arch):
    """A real block with its gate/up grouped: the fused forward runs, output and gradients unchanged."""
    from transformers import AutoModelForCausalLM

    from hubtool.quant import fused
    from hubtool.quant.qlinear import LinearGroup, QLinear

    model = AutoModelForCausalLM.from_pretrained(tiny_models(arch), dtype=torch.bfloat16).eval()
    mlp = model.model.layers[0].mlp
    gate, up = QLinear(mlp.gate_proj), QLinear(mlp.up_proj)
    LinearGroup([gate, up])
    mlp.gate_proj, mlp.up_proj = gate, up
    x = torch.randn(2, 24, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(
        torch.bfloat16
    )

    def run():
        xi = x.clone().requires_grad_()
        out = mlp(xi)
        out.float().pow(2).sum().backward()
        return out.float(), xi.grad.float()

    ref, ref_grad = run()
    calls = []
    real = fused.gated_act
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused, "gated_act", lambda *a: calls.append(1) or real(*a))
        with cpu_fused_ops(model.model.layers[0], torch.device("cpu")):
            out, grad = run()
    assert calls, "the fused path did not run"
    assert "forward" not in mlp.__dict__  # restored
    assert (out - ref).abs().max() / ref.abs().max() < 1e-2
    assert (grad - ref_grad).abs().max() / ref_grad.abs().max() < 2e-2


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_matches_the_module(tiny_models, arch, dtype):
    """Gemma's (1 + w, fp32) and Llama's (rounded, then w) RMSNorm, value and gradient, on a transposed view."""
    from transformers import AutoModelForCausalLM

    from hubtool.quant.fused import norm_mode

    model = AutoModelForCausalLM.from_pretrained(tiny_models(arch), dtype=dtype).eval()
    norm = model.model.layers[0].input_layernorm
    assert norm_mode(norm) == (0 if arch == "gemma3" else 1)
    assert norm_mode(model.model.layers[0].mlp) is None
    for p in norm.parameters():
        p.requires_grad_(False)
        p.copy_(torch.randn(p.shape) * 0.5)  # a weight far from its init, so that w matters
    d = norm.weight.shape[0]
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(2, 40, 3, d, generator=g) * 4).to(dtype)
    dy = torch.randn(2, 3, 40, d, generator=g).to(dtype)

    def run(fused: bool):
        x = base.clone().requires_grad_()
        xt = x.transpose(1, 2)  # (2, 3, 40, d), not contiguous: the per-head norms' input
        with cpu_fused_ops(model.model.layers[0], torch.device("cpu")) if fused else contextlib.nullcontext():
            out = norm(xt)
        out.backward(dy)
        return out.detach().float(), x.grad.float(), out.stride() == xt.stride()

    ref, ref_grad, _ = run(False)
    out, grad, same_strides = run(True)
    assert same_strides and "forward" not in norm.__dict__
    tol = 2**-6 if dtype == torch.bfloat16 else 1e-5  # Llama rounds twice: one ulp can become two
    assert ((out - ref).abs() / (ref.abs() + 1e-2)).max() < tol
    assert (grad - ref_grad).abs().max() / ref_grad.abs().max() < 4 * tol
    if dtype == torch.bfloat16:
        assert (out == ref).float().mean() > 0.99


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["transposed", "contiguous"])
def test_rope_matches_transformers(dtype, layout):
    """Queries (4 heads) and keys (1 head) on the heads' transposed view or contiguous, cos/sin per sample."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from hubtool.quant.fused import _fused_rope

    g = torch.Generator().manual_seed(5)
    b, length, d = 2, 33, 64

    def heads(n):
        t = torch.randn(b, length, n, d, generator=g).to(dtype)
        t = t.transpose(1, 2) if layout == "transposed" else t.transpose(1, 2).contiguous()
        return t.requires_grad_()

    q, k = heads(4), heads(1)
    pos = torch.arange(length)[None, :, None] * (1 + torch.arange(b))[:, None, None]  # per-sample positions
    freq = pos * torch.rand(1, 1, d // 2, generator=g)
    cos, sin = torch.cat([freq, freq], -1).cos().to(dtype), torch.cat([freq, freq], -1).sin().to(dtype)
    dq = torch.randn(q.shape, generator=g).to(dtype)
    dk = torch.randn(k.shape, generator=g).to(dtype)

    def run(fn):
        qi, ki = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
        if layout == "transposed":  # the same strides as the model's views
            qi = q.detach().transpose(1, 2).clone().transpose(1, 2).requires_grad_()
            ki = k.detach().transpose(1, 2).clone().transpose(1, 2).requires_grad_()
        qe, ke = fn(qi, ki, cos, sin)
        torch.autograd.backward((qe, ke), (dq, dk))
        return qe.detach(), ke.detach(), qi.grad, ki.grad, qe.stride() == qi.stride()

    ref = run(apply_rotary_pos_emb)
    ours = run(_fused_rope(apply_rotary_pos_emb))
    assert ours[4], "the output keeps the input's strides"
    for x, y in zip(ours[:4], ref[:4], strict=True):
        assert x.shape == y.shape
        if dtype == torch.bfloat16:  # torch's three roundings, done the same way: identical
            assert torch.equal(x, y)
        else:
            assert torch.allclose(x, y, rtol=1e-6, atol=1e-6)
