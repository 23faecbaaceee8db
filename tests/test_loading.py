"""Loading the exports back: hubtool.load for every format, plain from_pretrained for hubtool's own.

Bounds (logits, bf16 models):
* ``reference`` backend vs the in-memory fake-quantized model: max |diff| <= 1e-3, i.e. identical —
  reference dequantizes to the same bf16 weight and runs the same matmul;
* ``torch`` backend (torch's int4 CPU kernel) vs ``reference``: max |diff| <= 3% of max |logit|
  (observed about 1%: the kernel accumulates bf16 activations times int4 differently).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from hubtool.core import packing
from hubtool.core.spec import QuantSpec
from hubtool.errors import HubtoolError
from hubtool.formats.export import FORMATS
from hubtool.kernels import cpu
from hubtool.runtime.int4linear import Int4Linear
from hubtool.runtime.loader import load_processor, load_quantized
from tests.test_formats import exported

EXACT = 1e-3
TORCH_REL = 0.03
ARCHS = ("llama", "phi3", "qwen2", "gemma3", "llava")


def inputs_for(ex) -> dict[str, torch.Tensor]:
    """Two prompts (with an image for the VLM), as the model's processor builds them."""
    proc = ex.loaded.processor
    if ex.arch == "llava":
        image = Image.new("RGB", (32, 32), (200, 30, 90))
        return dict(
            proc(text="<image>\nWhat is in the picture? Describe it.", images=image, return_tensors="pt")
        )
    tok = getattr(proc, "tokenizer", proc)
    return dict(
        tok(
            ["The quick brown fox jumps", "def main(): return 42 if x else None"],
            return_tensors="pt",
            padding=True,
        )
    )


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


def int4_layers(model) -> dict[str, Int4Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_format_loads_back_to_the_fake_quantized_model(
    arch, tiny_models, tmp_path_factory, monkeypatch
):
    """Quantize -> export -> load: same int4 weights in every format, logits identical to the fake-quant model."""
    ex = exported(arch, tiny_models(arch), tmp_path_factory.mktemp("exports"))
    x = inputs_for(ex)
    want = logits(ex.fake_quant(), x)
    dense = {name: iw.dequantize() for name, iw in ex.weights.items()}
    others = None
    for fmt in FORMATS:
        model = load_quantized(ex.dirs[fmt], backend="reference")
        assert not model.training
        layers = int4_layers(model)
        assert sorted(layers) == sorted(ex.weights)
        for name, layer in layers.items():
            assert torch.equal(layer.dequantize(), dense[name]), (
                fmt,
                name,
            )  # every format: identical weights
        sd = {k: v for k, v in model.state_dict().items() if not k.startswith(tuple(layers))}
        if others is None:
            others = sd
        else:  # the 16-bit tensors are the same in every format too
            assert set(sd) == set(others) and all(torch.equal(sd[k], others[k]) for k in sd)
        got = logits(model, x)
        assert (got - want).abs().max().item() <= EXACT, fmt
    # hubtool's own format through plain transformers, after `import hubtool`
    from transformers import AutoConfig

    from hubtool.source import auto_model_class

    monkeypatch.setenv("HUBTOOL_KERNEL", "reference")
    cls = auto_model_class(AutoConfig.from_pretrained(ex.dirs["hubtool"]))
    model = cls.from_pretrained(ex.dirs["hubtool"])
    assert sorted(int4_layers(model)) == sorted(ex.weights)
    assert model.dtype == torch.bfloat16
    assert (logits(model, x) - want).abs().max().item() <= EXACT


def test_backends_agree_on_a_loaded_model(tiny_models, tmp_path_factory):
    """torch's int4 kernel vs the reference dequantize+matmul on the same loaded model."""
    ex = exported("llama", tiny_models("llama"), tmp_path_factory.mktemp("exports"))
    x = inputs_for(ex)
    ref = logits(load_quantized(ex.dirs["hubtool"], backend="reference"), x)
    model = load_quantized(ex.dirs["hubtool"], backend="torch")
    got = logits(model, x)
    assert {m.last_backend for m in int4_layers(model).values()} == {"torch"}
    assert (got - ref).abs().max().item() <= TORCH_REL * ref.abs().max().item()


def test_asymmetric_checkpoints_round_trip(tiny_models, tmp_path_factory):
    """--asym: zero points other than 8 survive every format."""
    spec = QuantSpec(sym=False)
    ex = exported("qwen2", tiny_models("qwen2"), tmp_path_factory.mktemp("exports"), spec=spec)
    assert any(bool((iw.zero != 8).any()) for iw in ex.weights.values())
    x = inputs_for(ex)
    want = logits(ex.fake_quant(), x)
    for fmt in FORMATS:
        model = load_quantized(ex.dirs[fmt], backend="reference")
        assert (logits(model, x) - want).abs().max().item() <= EXACT, fmt


def _rewrite(folder, fn) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _set_qconfig(folder, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"].update(changes)
    path.write_text(json.dumps(config))


def test_act_order_g_idx_loads_and_runs_on_the_reference_backend(tiny_models, tmp_path_factory, tmp_path):
    """A GPTQ desc_act checkpoint (permuted g_idx) dequantizes correctly; auto picks a backend that can run it."""
    from hubtool.quant.rtn import quantize_rtn

    ex = exported("llama", tiny_models("llama"), tmp_path_factory.mktemp("exports"))
    folder = tmp_path / "act-order"
    shutil.copytree(ex.dirs["auto_gptq"], folder)
    name = "model.layers.0.mlp.down_proj"  # K = 256: two groups
    w = ex.loaded.model.get_submodule(name).weight.detach().float()
    k = w.shape[1]
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(1))
    iw_p = quantize_rtn(w[:, perm], QuantSpec())  # groups are runs of the permuted order
    q = torch.empty_like(iw_p.q)
    q[:, perm] = iw_p.q
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // 128).to(torch.int32)
    iw_p.q = q
    packed = packing.pack(iw_p)
    expected = packing.dequantize(packed.qweight, packed.qzeros, packed.scales, g_idx)
    assert torch.allclose(
        expected[:, perm], iw_p.scale.repeat_interleave(128, 1) * (iw_p.q[:, perm].float() - 8)
    )

    def patch(ts):
        ts[f"{name}.qweight"], ts[f"{name}.qzeros"], ts[f"{name}.scales"] = (
            packed.qweight,
            packed.qzeros,
            packed.scales,
        )
        ts[f"{name}.g_idx"] = g_idx

    _rewrite(folder, patch)
    _set_qconfig(folder, desc_act=True)
    model = load_quantized(
        folder, backend="torch"
    )  # the torch kernel cannot run a permuted g_idx: reference does
    layer = model.get_submodule(name)
    assert not layer.trivial_g_idx
    assert torch.equal(layer.dequantize(), expected)
    x = inputs_for(ex)
    got = logits(model, x)
    assert layer.last_backend == "reference"
    fq = ex.fake_quant()
    original = fq.get_submodule(name).weight.detach().clone()
    try:
        with torch.no_grad():
            fq.get_submodule(name).weight.copy_(expected.to(torch.bfloat16))
        want = logits(fq, x)
    finally:
        with torch.no_grad():
            fq.get_submodule(name).weight.copy_(original)
    assert (got - want).abs().max().item() <= TORCH_REL * want.abs().max().item()


def test_gptq_v2_zero_points_are_converted(tiny_models, tmp_path_factory, tmp_path):
    """checkpoint_format gptq_v2 stores zero points as they are; they load to the same weights as v1."""
    ex = exported("llama", tiny_models("llama"), tmp_path_factory.mktemp("exports"))
    folder = tmp_path / "v2"
    shutil.copytree(ex.dirs["auto_gptq"], folder)

    def to_v2(ts):
        for key in [k for k in ts if k.endswith(".qzeros")]:
            ts[key] = ts[key] + 0x11111111  # every nibble +1: 7 -> 8

    _rewrite(folder, to_v2)
    _set_qconfig(folder, checkpoint_format="gptq_v2", format="gptq_v2")
    model = load_quantized(folder, backend="reference")
    for name, layer in int4_layers(model).items():
        assert torch.equal(layer.dequantize(), ex.weights[name].dequantize())


def _pack_awq(x: torch.Tensor) -> torch.Tensor:
    """uint (R, C) -> AWQ GEMM int32 (R, C/8): column j of each 8 in nibble (0, 4, 1, 5, 2, 6, 3, 7)[j]."""
    order = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7], dtype=torch.int32) * 4
    r, c = x.shape
    return (x.to(torch.int32).reshape(r, c // 8, 8) << order).sum(-1, dtype=torch.int32)


def test_awq_checkpoints_load_and_resave_as_gptq(tiny_models, tmp_path_factory, tmp_path, monkeypatch):
    """An AWQ GEMM checkpoint (asymmetric, zero points as is) loads exactly; save_pretrained writes GPTQ v1."""
    monkeypatch.setenv("HUBTOOL_KERNEL", "reference")
    ex = exported(
        "qwen2", tiny_models("qwen2"), tmp_path_factory.mktemp("exports"), spec=QuantSpec(sym=False)
    )
    folder = tmp_path / "awq"
    shutil.copytree(ex.dirs["auto_round"], folder)

    def to_awq(ts):
        for name, iw in ex.weights.items():
            ts[f"{name}.qweight"] = _pack_awq(iw.q.t())  # (K, N/8)
            ts[f"{name}.qzeros"] = _pack_awq(iw.zero.t())  # (G, N/8), zero as is

    _rewrite(folder, to_awq)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 128,
        "version": "gemm",
        "zero_point": True,
    }
    (folder / "config.json").write_text(json.dumps(config))
    x = inputs_for(ex)
    want = logits(ex.fake_quant(), x)
    model = load_quantized(folder)
    for name, layer in int4_layers(model).items():
        assert torch.equal(layer.dequantize(), ex.weights[name].dequantize())
    assert (logits(model, x) - want).abs().max().item() <= EXACT
    model.save_pretrained(tmp_path / "resaved")
    qc = json.loads((tmp_path / "resaved" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "hubtool" and qc["packing_format"] == "gptq"
    assert (logits(load_quantized(tmp_path / "resaved"), x) - want).abs().max().item() <= EXACT


def test_loaded_model_saves_and_dequantizes(tiny_models, tmp_path_factory, tmp_path, monkeypatch):
    """save_pretrained of a loaded model writes a loadable hubtool checkpoint; model.dequantize() gives nn.Linear."""
    monkeypatch.setenv("HUBTOOL_KERNEL", "reference")
    ex = exported("qwen2", tiny_models("qwen2"), tmp_path_factory.mktemp("exports"))
    x = inputs_for(ex)
    model = load_quantized(ex.dirs["auto_round"])
    want = logits(model, x)
    model.save_pretrained(tmp_path / "resaved")
    again = load_quantized(tmp_path / "resaved")
    assert sorted(int4_layers(again)) == sorted(ex.weights)
    assert (logits(again, x) - want).abs().max().item() <= EXACT
    dense = again.dequantize()
    assert not int4_layers(dense)
    assert (logits(dense, x) - want).abs().max().item() <= EXACT


def test_load_processor_gives_tokenizer_or_processor(tiny_models, tmp_path_factory):
    """Text model -> tokenizer with the chat template; VLM -> processor."""
    ex = exported("llama", tiny_models("llama"), tmp_path_factory.mktemp("exports"))
    tok = load_processor(ex.dirs["hubtool"])
    assert tok.chat_template and tok("hello")["input_ids"]
    vlm = exported("llava", tiny_models("llava"), tmp_path_factory.mktemp("exports"))
    proc = load_processor(vlm.dirs["auto_round"])
    assert hasattr(proc, "image_processor") and proc.tokenizer.chat_template


# -- bad input -------------------------------------------------------------------------------------
@pytest.fixture
def export_copy(tiny_models, tmp_path_factory, tmp_path):
    ex = exported("llama", tiny_models("llama"), tmp_path_factory.mktemp("exports"))
    folder = tmp_path / "copy"
    shutil.copytree(ex.dirs["hubtool"], folder)
    return folder


def _one_line(exc_info) -> str:
    line = exc_info.value.line()
    assert "\n" not in line
    return line


def test_truncated_safetensors_is_a_hubtool_error(export_copy):
    path = export_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(HubtoolError) as info:
        load_quantized(export_copy)
    assert "model.safetensors" in _one_line(info)


def test_garbage_safetensors_header_is_a_hubtool_error(export_copy):
    path = export_copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32
    path.write_bytes(bytes(data))
    with pytest.raises(HubtoolError):
        load_quantized(export_copy)


def test_index_naming_a_missing_shard_is_a_hubtool_error(export_copy):
    (export_copy / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(HubtoolError) as info:
        load_quantized(export_copy)
    assert "missing" in _one_line(info)


@pytest.mark.parametrize(
    "qc,words",
    [
        (None, "not quantized"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "gemv"),
        ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "8-bit"),
        (
            {"quant_method": "auto-round", "bits": 4, "packing_format": "auto_round:llm_compressor"},
            "packing_format",
        ),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes"),
        # AWQ declared over GPTQ-shaped tensors: the shapes cannot fit
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True}, ""),
    ],
)
def test_unsupported_quantization_configs_are_refused(export_copy, qc, words):
    path = export_copy / "config.json"
    config = json.loads(path.read_text())
    if qc is None:
        del config["quantization_config"]
    else:
        config["quantization_config"] = qc
    path.write_text(json.dumps(config))
    with pytest.raises(HubtoolError) as info:
        load_quantized(export_copy)
    assert words in _one_line(info)


def test_broken_config_json_is_a_hubtool_error(export_copy):
    (export_copy / "config.json").write_text("{not json")
    with pytest.raises(HubtoolError) as info:
        load_quantized(export_copy)
    assert "config.json" in _one_line(info)


def test_pickle_only_folder_is_refused(export_copy):
    (export_copy / "model.safetensors").rename(export_copy / "pytorch_model.bin")
    with pytest.raises(HubtoolError) as info:
        load_quantized(export_copy)
    assert "pickle" in _one_line(info)


@pytest.mark.skipif(not cpu.load(), reason="CPU kernel could not be built here")
def test_a_loaded_model_holds_one_copy_of_its_int4_weights(tiny_models, tmp_path_factory, tmp_path):
    """On the CPU every int4 layer keeps only the kernel's layout after loading; qweight is rebuilt bit for
    bit wherever it is read (state_dict, save_pretrained, a dtype move), and the logits do not change."""
    ex = exported("llama", tiny_models("llama"), tmp_path_factory.mktemp("exports"))
    x = inputs_for(ex)
    folder = ex.dirs["hubtool"]
    on_disk = {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    model = load_quantized(folder)
    layers = int4_layers(model)
    assert layers and all("qweight" not in m._buffers for m in layers.values())
    state = model.state_dict()
    for name in layers:
        assert torch.equal(state[f"{name}.qweight"], on_disk[f"{name}.qweight"]), name
    got = logits(model, x)
    assert {m.last_backend for m in layers.values()} == {"hubtool"}
    ref = logits(load_quantized(folder, backend="reference"), x)
    assert (got - ref).abs().max().item() <= TORCH_REL * ref.abs().max().item()
    model.save_pretrained(tmp_path / "resaved")
    resaved = {
        k: v for f in sorted((tmp_path / "resaved").glob("*.safetensors")) for k, v in load_file(f).items()
    }
    for name in layers:
        for suffix in ("qweight", "qzeros", "scales"):
            assert torch.equal(resaved[f"{name}.{suffix}"], on_disk[f"{name}.{suffix}"]), (name, suffix)
    torch.nn.Module.float(model)  # a move (transformers refuses .float()): qweight is a buffer again
    for name, m in layers.items():
        assert torch.equal(m._buffers["qweight"], on_disk[f"{name}.qweight"]), name
