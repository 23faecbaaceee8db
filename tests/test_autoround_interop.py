"""auto-round interop, both directions, on tiny models (CPU).

* auto-round's own loader (transformers' AutoRound quantizer with auto-round installed, its CPU
  ``torch_zp`` QuantLinear) loads our ``auto_round`` export: logits equal ours (reference backend) within
  1e-3, i.e. identical bf16 results (both dequantize to the same bf16 weight).
* ``hubtool.load`` loads auto-round's exports of the same tiny model (RTN, iters=0): symmetric
  ``auto_round`` (auto_gptq packing), asymmetric with auto_gptq packing, and asymmetric in auto-round's
  default AWQ packing; logits equal auto-round's own quantized model (and, where auto-round can load its
  export on the CPU, auto-round's loader) within 1e-3.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from hubtool.runtime.int4linear import Int4Linear
from hubtool.runtime.loader import load_quantized
from hubtool.source import auto_model_class
from tests.test_formats import exported
from tests.test_loading import inputs_for, logits

pytest.importorskip("auto_round")
pytestmark = pytest.mark.slow

EXACT = 1e-3
_K192: dict[str, Path] = {}


def auto_round_load(folder: Path, **kwargs) -> nn.Module:
    """Load with transformers' AutoRound quantizer (auto-round's QuantLinear layers)."""
    from transformers import AutoConfig

    cls = auto_model_class(AutoConfig.from_pretrained(folder))
    return cls.from_pretrained(folder, device_map="cpu", **kwargs).eval()


def is_auto_round_layer(module: nn.Module) -> bool:
    return type(module).__module__.startswith("auto_round_extension") and hasattr(module, "qweight")


def source(arch: str, tiny_models, tmp_path_factory) -> Path:
    if arch != "llama-k192":
        return tiny_models(arch)
    if "src" not in _K192:
        from tests import tiny

        _K192["src"] = tiny.build_text_model("llama", tmp_path_factory.mktemp("k192"), inter=192)
    return _K192["src"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llava", "llama-k192"])
def test_auto_round_loads_our_auto_round_export(arch, tiny_models, tmp_path_factory):
    """Same layers quantized (skipped ones stay nn.Linear), same logits as hubtool's loader."""
    ex = exported(arch, source(arch, tiny_models, tmp_path_factory), tmp_path_factory.mktemp("exports"))
    theirs = auto_round_load(ex.dirs["auto_round"])
    quantized = sorted(n for n, m in theirs.named_modules() if is_auto_round_layer(m))
    assert quantized == sorted(ex.weights)
    for skipped in (s.name for s in ex.plan.skipped):
        assert type(theirs.get_submodule(skipped)) is nn.Linear
    ours = load_quantized(ex.dirs["auto_round"], backend="reference")
    x = inputs_for(ex)
    want = logits(ours, x)
    assert (logits(theirs, x) - want).abs().max().item() <= EXACT
    assert (want - logits(ex.fake_quant(), x)).abs().max().item() <= EXACT


def test_auto_round_loads_our_auto_gptq_export(tiny_models, tmp_path_factory):
    """auto-round also serves GPTQ checkpoints (transformers needs gptqmodel otherwise): same logits."""
    from transformers import AutoRoundConfig

    ex = exported("qwen2", tiny_models("qwen2"), tmp_path_factory.mktemp("exports"))
    theirs = auto_round_load(ex.dirs["auto_gptq"], quantization_config=AutoRoundConfig())
    assert sorted(n for n, m in theirs.named_modules() if is_auto_round_layer(m)) == sorted(ex.weights)
    x = inputs_for(ex)
    want = logits(load_quantized(ex.dirs["auto_gptq"], backend="reference"), x)
    assert (logits(theirs, x) - want).abs().max().item() <= EXACT


def _auto_round(src: Path, sym: bool):
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(src)
    return AutoRound(
        model, tok, bits=4, group_size=128, sym=sym, iters=0, disable_opt_rtn=True, device_map="cpu"
    )


def _saved(out: Path) -> Path:
    """auto-round may write into a sub-folder named after the model."""
    return next(p.parent for p in sorted(Path(out).rglob("config.json")))


def _check_ours(folder: Path, ex, want: torch.Tensor, x) -> None:
    model = load_quantized(folder, backend="reference")
    layers = sorted(n for n, m in model.named_modules() if isinstance(m, Int4Linear))
    assert layers == sorted(ex.weights)
    assert (logits(model, x) - want).abs().max().item() <= EXACT


def test_hubtool_loads_auto_rounds_symmetric_export(tiny_models, tmp_path_factory, tmp_path):
    """auto-round RTN (iters=0) -> save_quantized(format=auto_round) -> hubtool.load == auto-round's model and loader."""
    ex = exported("qwen2", tiny_models("qwen2"), tmp_path_factory.mktemp("exports"), formats=())
    x = inputs_for(ex)
    ar = _auto_round(ex.src, sym=True)
    qmodel, _ = ar.quantize()
    want = logits(qmodel.eval(), x)
    ar.save_quantized(str(tmp_path / "ar"), format="auto_round")
    folder = _saved(tmp_path / "ar")
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["packing_format"], qc["sym"]) == (
        "auto-round",
        "auto_round:auto_gptq",
        True,
    )
    _check_ours(folder, ex, want, x)
    assert (logits(auto_round_load(folder), x) - want).abs().max().item() <= EXACT


def test_hubtool_loads_auto_rounds_asymmetric_exports(tiny_models, tmp_path_factory, tmp_path):
    """Asymmetric: auto_gptq packing (zero-1) and auto-round's default AWQ packing (zero as is) both load exactly."""
    ex = exported("qwen2", tiny_models("qwen2"), tmp_path_factory.mktemp("exports"), formats=())
    x = inputs_for(ex)
    ar = _auto_round(ex.src, sym=False)
    qmodel, _ = ar.quantize()
    want = logits(qmodel.eval(), x)
    ar.save_quantized(str(tmp_path / "gptq-packing"), format="auto_round:auto_gptq")
    _check_ours(_saved(tmp_path / "gptq-packing"), ex, want, x)
    # auto-round's default asymmetric export (a fresh run: RTN is deterministic, so the same integers)
    _auto_round(ex.src, sym=False).quantize_and_save(str(tmp_path / "default"), format="auto_round")
    folder = _saved(tmp_path / "default")
    packing = json.loads((folder / "config.json").read_text())["quantization_config"]["packing_format"]
    assert "awq" in packing or "gptq" in packing
    _check_ours(folder, ex, want, x)
