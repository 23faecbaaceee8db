"""Fused RMSNorms in a loaded int4 model: the modules' own numbers, only when no gradient is wanted."""

from __future__ import annotations

import copy

import pytest
import torch

from hubtool.kernels import cpu
from hubtool.runtime.fused_norms import _CLASSES
from hubtool.runtime.loader import load_quantized
from tests.test_formats import exported

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_fused_norms_give_the_modules_numbers(arch, tiny_models, tmp_path_factory, monkeypatch):
    """Logits and greedy tokens of a loaded model with fused norms equal those with the modules' forwards
    (HUBTOOL_FUSED_NORMS=0), and the fused op did run (and not where a gradient is wanted)."""
    if not cpu.load():
        pytest.skip("CPU kernel library unavailable")
    ex = exported(arch, tiny_models(arch), tmp_path_factory.mktemp("exports"), formats=["hubtool"])
    monkeypatch.setenv("HUBTOOL_FUSED_NORMS", "0")
    plain = load_quantized(ex.dirs["hubtool"], dtype=torch.bfloat16)
    monkeypatch.delenv("HUBTOOL_FUSED_NORMS")
    fused = load_quantized(ex.dirs["hubtool"], dtype=torch.bfloat16)
    norms = [m for m in fused.modules() if type(m) in _CLASSES.values()]
    assert norms and not any(type(m) in _CLASSES.values() for m in plain.modules())
    calls = []
    real = torch.ops.hubtool.rms_norm_fwd
    monkeypatch.setattr(torch.ops.hubtool, "rms_norm_fwd", lambda *a: calls.append(1) or real(*a))
    ids = torch.tensor([[1, 5, 9, 11, 40, 7]])
    with torch.inference_mode():
        want, got = plain(input_ids=ids).logits, fused(input_ids=ids).logits
        kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert torch.equal(plain.generate(input_ids=ids, **kw), fused.generate(input_ids=ids, **kw))
    assert len(calls) >= len(norms)
    assert torch.equal(got, want)  # the module's roundings: bit for bit here (bf16 logits)
    calls.clear()
    fused(input_ids=ids)  # grad mode: the modules' own forwards
    assert not calls
    copied = copy.deepcopy(fused).to(torch.float32)  # a copy in another dtype runs its own weights
    with torch.inference_mode():
        assert torch.isfinite(copied(input_ids=ids).logits).all() and calls
