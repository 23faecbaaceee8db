"""auto-round interop, both directions, on tiny models (CPU).

* auto-round's own loader (transformers' AutoRound quantizer with auto-round installed, its CPU
  ``torch_zp`` QuantLinear) loads our ``auto_round`` / ``auto_gptq`` exports: every quantized layer holds
  the same bf16 weight as ours (bit for bit), and the bf16 logits agree within one bf16 rounding of the
  largest logit (see ``same_as_ours``).
* ``hubtool.load`` loads auto-round's exports of the same tiny model (RTN, iters=0): symmetric
  ``auto_round`` (auto_gptq packing), asymmetric with auto_gptq packing, and asymmetric in auto-round's
  default AWQ packing; logits equal auto-round's own quantized model within 1e-3 (fp32 on both sides:
  measured identical), and, where auto-round can load its export on the CPU, equal auto-round's loader
  as above.
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
# Our bf16 logits vs auto-round's loader's, after same_as_ours has checked that every layer holds the same
# bf16 weight bit for bit: the only difference left is the order in which the CPU's bf16 matmul sums.
# auto-round's QuantLinear computes matmul(x, W) with W laid out (K, N), ours F.linear(x, W) with W (N, K).
# On an AVX2-only CPU (no AVX-512, so no oneDNN bf16 path) torch 2.13 sums the two layouts in a different
# order (both in fp32: measured, each is within one bf16 rounding of the exact product), so a few layer
# outputs differ in their last bf16 bit. Measured on an AVX2 AMD EPYC: llava's logits differ by 0.0078 (one
# bf16 ulp of a logit in [1, 2); max |logit| 2.41), llama / qwen2 / llama-k192's by 0. Bound: at least one
# bf16 ulp of the largest logit, 2**-7 * max|logit| (0.019 for llava). A wrong zero point, scale or packing
# fails the bit-exact layer check (a zero point off by one in one group moves qwen2's logits by 0.086).
BF16_SUM_ORDER = 2**-7
_K192: dict[str, Path] = {}


def auto_round_load(folder: Path, **kwargs) -> nn.Module:
    """Load with transformers' AutoRound quantizer (auto-round's QuantLinear layers)."""
    from transformers import AutoConfig

    cls = auto_model_class(AutoConfig.from_pretrained(folder))
    return cls.from_pretrained(folder, device_map="cpu", **kwargs).eval()


def is_auto_round_layer(module: nn.Module) -> bool:
    return type(module).__module__.startswith("auto_round_extension") and hasattr(module, "qweight")


def same_as_ours(theirs: nn.Module, ours: nn.Module, names, x) -> None:
    """Each named layer maps the identity to the same bf16 rows (weight and bias bit for bit), and the
    bf16 logits agree within BF16_SUM_ORDER of the largest logit."""
    for name in names:
        layer = ours.get_submodule(name)
        # Row i of layer(I) is column i of W (plus the bias): one product with 1.0 per output, exact in
        # any summation order, so this compares the dequantized weights whatever the matmul kernel.
        eye = torch.eye(layer.in_features, dtype=torch.bfloat16)
        with torch.no_grad():
            assert torch.equal(theirs.get_submodule(name)(eye), layer(eye)), name
    want = logits(ours, x)
    assert (logits(theirs, x) - want).abs().max().item() <= BF16_SUM_ORDER * want.abs().max().item()


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
    same_as_ours(theirs, ours, quantized, x)
    assert (logits(ours, x) - logits(ex.fake_quant(), x)).abs().max().item() <= EXACT


def test_auto_round_loads_our_auto_gptq_export(tiny_models, tmp_path_factory):
    """auto-round also serves GPTQ checkpoints (transformers needs gptqmodel otherwise): same logits."""
    from transformers import AutoRoundConfig

    ex = exported("qwen2", tiny_models("qwen2"), tmp_path_factory.mktemp("exports"))
    theirs = auto_round_load(ex.dirs["auto_gptq"], quantization_config=AutoRoundConfig())
    assert sorted(n for n, m in theirs.named_modules() if is_auto_round_layer(m)) == sorted(ex.weights)
    ours = load_quantized(ex.dirs["auto_gptq"], backend="reference")
    same_as_ours(theirs, ours, sorted(ex.weights), inputs_for(ex))


def _auto_round(src: Path, sym: bool):
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(src)
    # amp=False: the quantized model computes in fp32 on every CPU. With amp on, auto-round keeps bf16 only
    # where the CPU has AVX512_BF16 (CpuInfo) and casts the model to fp32 elsewhere, so the reference
    # logits' dtype would depend on the machine (bf16 vs fp32 logits differ by ~0.02 on these models).
    return AutoRound(
        model,
        tok,
        bits=4,
        group_size=128,
        sym=sym,
        iters=0,
        disable_opt_rtn=True,
        device_map="cpu",
        amp=False,
    )


def _saved(out: Path) -> Path:
    """auto-round may write into a sub-folder named after the model."""
    return next(p.parent for p in sorted(Path(out).rglob("config.json")))


def _check_ours(folder: Path, ex, want: torch.Tensor, x) -> None:
    """hubtool loads the export in fp32, the dtype auto-round's quantized model computes in (amp=False)."""
    model = load_quantized(folder, backend="reference", dtype=torch.float32)
    layers = sorted(n for n, m in model.named_modules() if isinstance(m, Int4Linear))
    assert layers == sorted(ex.weights)
    assert (logits(model, x) - want).abs().max().item() <= EXACT


def test_hubtool_loads_auto_rounds_symmetric_export(tiny_models, tmp_path_factory, tmp_path):
    """auto-round RTN (iters=0) -> save_quantized(format=auto_round) -> hubtool.load == auto-round's model and loader."""
    ex = exported("qwen2", tiny_models("qwen2"), tmp_path_factory.mktemp("exports"), formats=())
    x = inputs_for(ex)
    ar = _auto_round(ex.src, sym=True)
    qmodel, _ = ar.quantize()
    assert {p.dtype for p in qmodel.parameters()} == {torch.float32}
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
    ours = load_quantized(folder, backend="reference")
    # the export's config says float32 (auto-round's model computed in fp32): load it in ours' bf16
    same_as_ours(auto_round_load(folder, dtype=torch.bfloat16), ours, sorted(ex.weights), x)


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
