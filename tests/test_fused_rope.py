"""Fused rotary embeddings in eager CPU inference: transformers' numbers bit for bit, only where they apply."""

from __future__ import annotations

import sys

import pytest
import torch

from hubtool.kernels import cpu
from hubtool.runtime.fused_rope import ENV_VAR, NAME, restore_rope
from hubtool.runtime.loader import load_quantized
from tests.test_formats import exported

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_rope_gives_transformers_numbers(arch, dtype, tiny_models, tmp_path_factory, monkeypatch):
    """Logits (a prefill) and greedy tokens (decode steps with a cache) of a loaded model with the fused
    rotary embedding equal those with transformers' function, and the op ran exactly twice per layer call."""
    if not cpu.load():
        pytest.skip("CPU kernel library unavailable")
    ex = exported(arch, tiny_models(arch), tmp_path_factory.mktemp("exports"), formats=["hubtool"])
    model = load_quantized(ex.dirs["hubtool"], dtype=dtype)
    modeling = sys.modules[type(model).__module__]
    fused_fn = getattr(modeling, NAME)
    assert hasattr(fused_fn, "_hubtool_original")
    calls = []
    real = torch.ops.hubtool.rope
    monkeypatch.setattr(torch.ops.hubtool, "rope", lambda *a: calls.append(1) or real(*a))
    ids = torch.tensor([[1, 5, 9, 11, 40, 7, 300, 2]])
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    layers = model.config.num_hidden_layers
    with torch.inference_mode():
        got = model(input_ids=ids).logits
        assert len(calls) == 2 * layers  # queries and keys of each layer
        got_tokens = model.generate(input_ids=ids, **kw)
    assert len(calls) == 2 * layers * (1 + 8)  # that forward, then generate's prefill and 7 decode steps
    try:
        restore_rope()
        assert getattr(modeling, NAME) is fused_fn._hubtool_original
        calls.clear()
        with torch.inference_mode():
            want = model(input_ids=ids).logits
            want_tokens = model.generate(input_ids=ids, **kw)
        assert not calls
    finally:
        setattr(modeling, NAME, fused_fn)
    assert torch.equal(got, want)  # bit for bit
    assert torch.equal(got_tokens, want_tokens)


def test_fused_rope_falls_back(tiny_models, tmp_path_factory, monkeypatch):
    """With a gradient wanted, with HUBTOOL_FUSED_ROPE=0, or another layout, transformers' function runs."""
    if not cpu.load():
        pytest.skip("CPU kernel library unavailable")
    ex = exported("llama", tiny_models("llama"), tmp_path_factory.mktemp("exports"), formats=["hubtool"])
    model = load_quantized(ex.dirs["hubtool"], dtype=torch.bfloat16)
    fn = getattr(sys.modules[type(model).__module__], NAME)
    calls = []
    real = torch.ops.hubtool.rope
    monkeypatch.setattr(torch.ops.hubtool, "rope", lambda *a: calls.append(1) or real(*a))
    q = torch.randn(1, 4, 3, 32, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 3, 32, dtype=torch.bfloat16)
    cos, sin = torch.randn(1, 3, 32, dtype=torch.bfloat16), torch.randn(1, 3, 32, dtype=torch.bfloat16)
    want = fn._hubtool_original(q, k, cos, sin)
    fn(q, k, cos, sin)  # grad mode on: the original
    assert not calls
    with torch.no_grad():
        got = fn(q, k, cos, sin)
        assert len(calls) == 2 and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        monkeypatch.setenv(ENV_VAR, "0")
        fn(q, k, cos, sin)
        monkeypatch.delenv(ENV_VAR)
        qt, kt = q.transpose(1, 2), k.transpose(1, 2)  # (B, L, H, D) with cos at unsqueeze_dim=2
        fn(qt, kt, cos, sin, unsqueeze_dim=2)
    assert len(calls) == 2
