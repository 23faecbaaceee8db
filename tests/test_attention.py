"""The CPU tuning attention computes eager attention's function, forward and backward."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward  # handles softcap

from hubtool.quant import attention
from hubtool.quant.attention import NAME, cpu_tuning_attention, tuning_attention

pytestmark = pytest.mark.usefixtures("one_thread")

B, H, KV, L, D = 2, 4, 2, 24, 16


class _Module(torch.nn.Module):
    num_key_value_groups = H // KV
    is_causal = True
    training = False


def _inputs(seed=0, dtype=torch.bfloat16, length=L):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, n, length, D, generator=g).to(dtype).requires_grad_() for n in (H, KV, KV))
    return q, k, v


def _causal_bool(pad: int = 0, length: int = L) -> torch.Tensor:
    keep = torch.ones(length, length, dtype=torch.bool).tril().expand(B, 1, length, length).clone()
    keep[1, :, :, :pad] = False  # left padding of the second sample
    return keep


def _additive(keep: torch.Tensor) -> torch.Tensor:
    return torch.zeros(keep.shape, dtype=torch.bfloat16).masked_fill(~keep, torch.finfo(torch.bfloat16).min)


def _run(fn, mask, softcap=None, seed=0):
    q, k, v = _inputs(seed, length=mask.shape[-1] if mask is not None else L)
    kwargs = {"softcap": softcap} if softcap is not None else {}
    out, _ = fn(_Module(), q, k, v, mask, dropout=0.0, scaling=D**-0.5, **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(out.shape, generator=g).to(out.dtype)
    if mask is not None:  # padded queries (no key at all) are never scored: no gradient flows from them
        seen = mask.any(-1) if mask.dtype == torch.bool else (mask > -1e30).any(-1)
        w = w * seen[:, 0, :, None, None].to(w.dtype)
    grads = torch.autograd.grad((out.float() * w.float()).sum(), (q, k, v))
    return out.float(), [t.float() for t in grads]


@pytest.mark.parametrize("fused", [True, False])  # the C++ softmax (where built) and the torch code
@pytest.mark.parametrize("length", [L, 192])  # 192: the causal skip, three blocks of 64 queries
@pytest.mark.parametrize("kind", ["none", "bool", "additive", "padded"])
def test_matches_eager_forward_and_backward(kind, length, fused, monkeypatch):
    if not fused:
        monkeypatch.setattr(attention, "_kernels", lambda t: False)
    keep = _causal_bool(pad=5 if kind == "padded" else 0, length=length)
    eager_mask = _additive(keep)
    ours_mask = {"none": None, "bool": keep, "additive": eager_mask, "padded": keep}[kind]
    ref, ref_grads = _run(eager_attention_forward, eager_mask)
    if kind == "none":  # no mask: the length comes from the inputs
        q, k, v = _inputs(0, length=length)
        out, _ = tuning_attention(_Module(), q, k, v, None, dropout=0.0, scaling=D**-0.5)
        grads = torch.autograd.grad(
            (
                out.float()
                * torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype).float()
            ).sum(),
            (q, k, v),
        )
        out, grads = out.float(), [t.float() for t in grads]
    else:
        out, grads = _run(tuning_attention, ours_mask)
    mask4 = attention._additive_mask(ours_mask, _Module(), length, length, "cpu")
    assert len(attention._parts(mask4, length, length)) == (length // 64 if length >= 128 else 1)
    valid = keep[:, 0].any(-1)  # query rows with at least one key (fully padded rows are never scored)
    assert out.shape == ref.shape == (B, length, H, D)
    err = (out - ref)[valid].abs().max() / ref[valid].abs().max()
    assert err < 1e-2
    for a, b in zip(grads, ref_grads, strict=True):
        assert a.shape == b.shape
        assert (a - b).abs().max() / b.abs().max() < 2e-2


def test_fully_masked_rows_stay_finite():
    keep = _causal_bool(pad=5)
    keep[1, :, :5] = False  # the padded queries see no key at all
    out, grads = _run(tuning_attention, keep)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)


def test_softcap_falls_back_to_the_models_eager_attention(monkeypatch):
    """An eager model's own eager function (looked up in the module's file: here, this test file)."""
    ref, _ = _run(eager_attention_forward, _additive(_causal_bool()), softcap=2.0)
    plain, _ = _run(eager_attention_forward, _additive(_causal_bool()))
    cfg = type("Cfg", (), {})()
    monkeypatch.setattr(_Module, "config", cfg, raising=False)
    monkeypatch.setitem(attention._ORIGINAL, id(cfg), "eager")
    out, _ = _run(tuning_attention, _additive(_causal_bool()), softcap=2.0)
    assert (out - plain).abs().max() > 1e-2  # soft-capping changes the result...
    assert (out - ref).abs().max() / ref.abs().max() < 1e-2  # ...and the fallback computed it


def test_context_switches_a_real_block_and_restores(tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models("gemma3"), dtype=torch.bfloat16).eval()
    cfg = model.model.layers[0].self_attn.config
    before = cfg._attn_implementation
    ids = torch.randint(8, 200, (2, 40))
    with torch.no_grad():
        ref = model(ids).logits.float()
        with cpu_tuning_attention(model.model.layers[0], torch.device("cpu")):
            assert cfg._attn_implementation == NAME
            out = model(ids).logits.float()
        with cpu_tuning_attention(model.model.layers[0], torch.device("meta")):
            assert cfg._attn_implementation == before  # other devices keep the model's own
    assert cfg._attn_implementation == before
    assert (out - ref).abs().max() / ref.abs().max() < 2e-2


def test_non_causal_vision_tower_stays_non_causal(tiny_models):
    """A CLIP encoder (no mask, is_causal False) computes the same features inside the context."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_models("llava"), dtype=torch.bfloat16).eval()
    tower = model.model.vision_tower
    size = tower.config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        ref = tower(pixel_values=pixels).last_hidden_state.float()
        with cpu_tuning_attention(tower, torch.device("cpu")):
            out = tower(pixel_values=pixels).last_hidden_state.float()
    assert (out - ref).abs().max() / ref.abs().max() < 2e-2
