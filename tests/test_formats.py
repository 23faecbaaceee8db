"""GPTQ packing and the three export formats: bytes, files, configs, determinism, atomic writes."""

from __future__ import annotations

import copy
import errno
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from torch import nn

from hubtool.core import packing
from hubtool.core.intweight import IntWeight, PackedWeight
from hubtool.core.spec import QuantSpec
from hubtool.errors import HubtoolError
from hubtool.formats.export import FORMATS, export_format
from hubtool.quant.rtn import quantize_rtn

SPEC = QuantSpec()


# -- shared helpers (also used by test_loading / test_autoround_interop) --------------------------
@dataclass
class Exported:
    """A tiny model quantized with RTN, its fake-quantized twin, and its exports."""

    arch: str
    src: Path
    loaded: Any  # hubtool.source.LoadedModel
    plan: Any
    weights: dict[str, IntWeight]
    spec: QuantSpec
    root: Path
    dirs: dict[str, Path] = field(default_factory=dict)
    _fake: Any = None

    def fake_quant(self) -> nn.Module:
        """The 16-bit model whose quantized linears hold ``IntWeight.dequantize()`` (cast to the model dtype)."""
        if self._fake is None:
            fq = copy.deepcopy(self.loaded.model)
            with torch.no_grad():
                for name, iw in self.weights.items():
                    lin = fq.get_submodule(name)
                    lin.weight.copy_(iw.dequantize().to(lin.weight.dtype))
            self._fake = fq.eval()
        return self._fake


_CACHE: dict[tuple, Exported] = {}


def exported(arch: str, src: Path, tmp_root: Path, spec: QuantSpec = SPEC, formats=FORMATS) -> Exported:
    """Quantize ``src`` (a tiny model folder) with RTN and export ``formats`` once per session."""
    from hubtool.quant.driver import quantize_model
    from hubtool.quant.layers import plan_layers
    from hubtool.source import load_source, locate

    key = (arch, str(src), spec)
    if key not in _CACHE:
        loaded = load_source(locate(str(src)))
        plan = plan_layers(loaded.model, spec)
        result = quantize_model(loaded.model, plan, spec, "rtn")
        root = tmp_root / f"{arch}-{spec.group_size}-{'sym' if spec.sym else 'asym'}"
        _CACHE[key] = Exported(arch, Path(src), loaded, plan, result.weights, spec, root)
    ex = _CACHE[key]
    for fmt in formats:
        if fmt not in ex.dirs:
            out = ex.root / fmt
            export_format(ex.loaded.model, ex.loaded.processor, ex.weights, ex.spec, fmt, out, meta_for(ex))
            ex.dirs[fmt] = out
    return ex


def meta_for(ex: Exported) -> dict[str, Any]:
    """The meta dict the pipeline passes for an RTN run."""
    return {
        "method": "rtn",
        "recipe": None,
        "calibration": None,
        "hubtool_version": "test",
        "block_lists": ex.plan.block_lists,
        "quantized": sorted(ex.weights),
        "skipped": [s.name for s in ex.plan.skipped],
    }


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor in a format folder's safetensors files."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` by relative path."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def random_int_weight(n: int, k: int, g: int, sym: bool, seed: int = 0) -> IntWeight:
    """Codes, signed fp16-exact scales and zero points as RTN makes them, from a random weight."""
    torch.manual_seed(seed)
    w = torch.randn(n, k) * 0.05
    return quantize_rtn(w, QuantSpec(group_size=g, sym=sym))


# -- packing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("shape,g", [((64, 256), 128), ((24, 96), 32), ((8, 128), 64)])
def test_pack_unpack_round_trip_is_bit_exact(shape, g, sym):
    """pack -> unpack gives the same codes, scales and zeros; re-packing gives the same bytes."""
    iw = random_int_weight(*shape, g, sym)
    if sym:
        assert bool((iw.scale < 0).any()), "full-range RTN should produce some negative scales"
    t = packing.pack(iw)
    back = packing.unpack(t)
    assert torch.equal(back.q, iw.q)
    assert torch.equal(back.zero, iw.zero)
    assert torch.equal(back.scale, iw.scale)  # scales are fp16-exact, so fp16 storage is lossless
    assert back.group_size == g
    t2 = packing.pack(back)
    for a, b in ((t.qweight, t2.qweight), (t.qzeros, t2.qzeros), (t.scales, t2.scales)):
        assert a.numpy().tobytes() == b.numpy().tobytes()
    assert torch.equal(packing.dequantize(t.qweight, t.qzeros, t.scales), iw.dequantize())
    if sym:
        assert bool((t.qzeros == 0x77777777).all())


@pytest.mark.parametrize("sym", [True, False])
def test_nibble_packed_weight_round_trip(sym):
    """PackedWeight (what a calibration run holds) is half the bytes and unpacks bit for bit."""
    iw = random_int_weight(48, 256, 128, sym)
    p = PackedWeight.pack(iw)
    assert p.nibbles.dtype == torch.uint8 and p.nibbles.numel() * 2 == iw.q.numel()
    back = p.unpack()
    assert torch.equal(back.q, iw.q) and torch.equal(back.scale, iw.scale) and torch.equal(back.zero, iw.zero)
    with pytest.raises(ValueError):
        PackedWeight.pack(IntWeight(iw.q[:, :255], iw.scale, iw.zero, 128))


@pytest.mark.parametrize("sym", [True, False])
def test_pack_gives_the_bytes_auto_round_writes(sym):
    """auto-round 0.16's own packing (auto_round:auto_gptq QuantLinear.pack) of the same codes and scales."""
    pytest.importorskip("auto_round")
    from auto_round.export.export_to_autoround.export import dynamic_import_quant_linear_for_packing

    n, k, g = 96, 256, 128  # auto-round sizes qzeros as N // 32 * 4 words: N must be a multiple of 32
    iw = random_int_weight(n, k, g, sym, seed=3)
    lin = nn.Linear(k, n, bias=True)
    with torch.no_grad():
        lin.weight.copy_(iw.dequantize())
        lin.bias.normal_()
    quant_linear = dynamic_import_quant_linear_for_packing("auto_round:auto_gptq", 4, g, sym)
    ref = quant_linear(4, g, k, n, bias=True, weight_dtype=torch.float32)
    zeros = 8 if sym else iw.zero.to(torch.int32)  # auto-round passes the scalar for sym, a tensor for asym
    ref.pack(lin, iw.scale, zeros, None, device="cpu")
    ours = packing.pack(iw)
    assert ref.qweight.numpy().tobytes() == ours.qweight.numpy().tobytes()
    assert ref.qzeros.numpy().tobytes() == ours.qzeros.numpy().tobytes()
    assert ref.scales.numpy().tobytes() == ours.scales.numpy().tobytes()


# -- export files and configs --------------------------------------------------------------------
def test_every_format_is_a_complete_repo(tiny_models, tmp_path_factory):
    """config + quantization_config, generation config, weights, tokenizer and chat template in each format."""
    ex = exported("llama", tiny_models("llama"), tmp_path_factory.mktemp("exports"))
    methods = {"auto_round": "auto-round", "auto_gptq": "gptq", "hubtool": "hubtool"}
    for fmt in FORMATS:
        d = ex.dirs[fmt]
        names = {p.name for p in d.iterdir()}
        assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
        assert "chat_template.jinja" in names or "chat_template" in json.loads(
            (d / "tokenizer_config.json").read_text()
        )
        config = json.loads((d / "config.json").read_text())
        qc = config["quantization_config"]
        assert qc["quant_method"] == methods[fmt]
        assert (qc["bits"], qc["group_size"], qc["sym"]) == (4, 128, True)
        assert config["dtype"] == config["torch_dtype"] == "bfloat16"
        ts = tensors(d)
        for name in ex.weights:
            assert ts[f"{name}.qweight"].dtype == torch.int32
            assert ts[f"{name}.scales"].dtype == torch.float16
            assert (f"{name}.g_idx" in ts) == (fmt == "auto_gptq")
            assert f"{name}.weight" not in ts
        floats = {k: v for k, v in ts.items() if v.is_floating_point() and not k.endswith(".scales")}
        assert floats and all(
            v.dtype == torch.bfloat16 for v in floats.values()
        )  # 16-bit keeps the model dtype
        assert not [p for p in d.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    ar = json.loads((ex.dirs["auto_round"] / "config.json").read_text())["quantization_config"]
    assert ar["packing_format"] == "auto_round:auto_gptq" and ar["data_type"] == "int"
    assert ar["block_name_to_quantize"] == "model.layers" and ar["iters"] == 0
    gq = json.loads((ex.dirs["auto_gptq"] / "config.json").read_text())["quantization_config"]
    assert gq["desc_act"] is False and gq["checkpoint_format"] == "gptq"
    hq = json.loads((ex.dirs["hubtool"] / "config.json").read_text())["quantization_config"]
    assert sorted(hq["modules"]) == sorted(ex.weights) and hq["method"] == "rtn"


def test_configs_parse_with_transformers_classes(tiny_models, tmp_path_factory):
    """transformers' own AutoRoundConfig / GPTQConfig and hubtool's config accept what we write."""
    from transformers import AutoRoundConfig, GPTQConfig
    from transformers.quantizers.auto import AutoQuantizationConfig

    import hubtool  # noqa: F401  (registers HubtoolConfig)

    ex = exported("llama", tiny_models("llama"), tmp_path_factory.mktemp("exports"))

    def qc(fmt):
        return json.loads((ex.dirs[fmt] / "config.json").read_text())["quantization_config"]

    assert AutoRoundConfig.from_dict(qc("auto_round")).bits == 4
    assert GPTQConfig.from_dict(qc("auto_gptq")).format == "gptq"
    hub = AutoQuantizationConfig.from_dict(qc("hubtool"))
    assert type(hub).__name__ == "HubtoolConfig" and hub.modules == list(ex.weights)


def test_tied_embeddings_are_written_once(tiny_models, tmp_path_factory):
    """Qwen2 ties lm_head to the embeddings: the checkpoint holds the embedding only, as save_pretrained does."""
    ex = exported("qwen2", tiny_models("qwen2"), tmp_path_factory.mktemp("exports"), formats=("hubtool",))
    ts = tensors(ex.dirs["hubtool"])
    assert "model.embed_tokens.weight" in ts and "lm_head.weight" not in ts
    assert json.loads((ex.dirs["hubtool"] / "config.json").read_text())["tie_word_embeddings"] is True
    bias = [k for k in ts if k.endswith("q_proj.bias")]
    assert bias and all(ts[k].dtype == torch.bfloat16 for k in bias)  # biases of int4 layers stay 16-bit


def test_vlm_export_keeps_the_checkpoint_key_layout(tiny_models, tmp_path_factory):
    """LLaVA: keys as save_pretrained writes them; vision tower and projector stay 16-bit; processor saved."""
    ex = exported("llava", tiny_models("llava"), tmp_path_factory.mktemp("exports"), formats=("auto_round",))
    d = ex.dirs["auto_round"]
    src_keys = set(tensors(ex.src))
    ts = tensors(d)
    for name in ex.weights:
        assert name.startswith("model.language_model.layers.")
    qkeys = {k.rsplit(".", 1)[0] + ".weight" for k in ts if k.endswith(".qweight")}
    assert qkeys <= src_keys  # same names as the 16-bit checkpoint, with .weight -> .qweight etc.
    assert set(ts) - {k for k in ts if k.rsplit(".", 1)[1] in ("qweight", "qzeros", "scales")} <= src_keys
    assert any(k.startswith("vision_tower.") and ts[k].dtype == torch.bfloat16 for k in ts)
    assert (d / "processor_config.json").is_file() or (d / "preprocessor_config.json").is_file()
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert qc["block_name_to_quantize"] == "model.language_model.layers"


def test_sharded_export_writes_an_index(tiny_models, tmp_path):
    """A small max_shard_size splits the weights; the index maps every tensor to its shard."""
    ex = exported("llama", tiny_models("llama"), tmp_path / "x", formats=())
    out = tmp_path / "sharded"
    export_format(
        ex.loaded.model,
        ex.loaded.processor,
        ex.weights,
        SPEC,
        "hubtool",
        out,
        meta_for(ex),
        max_shard_size="64KB",
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    ts = tensors(out)
    assert set(index["weight_map"]) == set(ts)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ts.values())
    single = exported("llama", tiny_models("llama"), tmp_path / "x", formats=("hubtool",)).dirs["hubtool"]
    ref = tensors(single)
    assert set(ref) == set(ts) and all(torch.equal(ref[k], ts[k]) for k in ts)


def test_export_is_deterministic_and_leaves_the_model_untouched(tiny_models, tmp_path):
    """Exporting twice writes identical bytes; the model's parameters and modules are unchanged."""
    ex = exported("phi3", tiny_models("phi3"), tmp_path / "x", formats=())
    model = ex.loaded.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    for fmt in FORMATS:
        a, b = tmp_path / "a" / fmt, tmp_path / "b" / fmt
        export_format(model, ex.loaded.processor, ex.weights, SPEC, fmt, a, meta_for(ex))
        export_format(model, ex.loaded.processor, ex.weights, SPEC, fmt, b, meta_for(ex))
        assert digests(a) == digests(b)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in model.modules()] == types


def test_layer_whose_width_is_not_a_multiple_of_the_group_size_stays_16bit(tmp_path):
    """intermediate 192: down_proj (K=192) is skipped, stays bf16, and every format's config says so."""
    from tests import tiny

    src = tiny.build_text_model("llama", tmp_path / "src", inter=192)
    ex = exported("llama-k192", src, tmp_path / "x")
    skipped = [n for n in (s.name for s in ex.plan.skipped) if n.endswith("down_proj")]
    assert len(skipped) == 2 and not any(n.endswith("down_proj") for n in ex.weights)
    for fmt in FORMATS:
        ts = tensors(ex.dirs[fmt])
        for name in skipped:
            assert ts[f"{name}.weight"].dtype == torch.bfloat16 and f"{name}.qweight" not in ts
    ar = json.loads((ex.dirs["auto_round"] / "config.json").read_text())["quantization_config"]
    assert set(ar["extra_config"]) == set(skipped) and all(
        v["bits"] == 16 for v in ar["extra_config"].values()
    )
    gq = json.loads((ex.dirs["auto_gptq"] / "config.json").read_text())["quantization_config"]
    assert "mlp.down_proj" not in gq["modules_in_block_to_quantize"][0]
    assert "mlp.up_proj" in gq["modules_in_block_to_quantize"][0]
    hq = json.loads((ex.dirs["hubtool"] / "config.json").read_text())["quantization_config"]
    assert not set(skipped) & set(hq["modules"])


# -- failures --------------------------------------------------------------------------------------
def _fail_on_save(monkeypatch, exc: BaseException) -> None:
    """The export's file writer fails after the header and one tensor are in the file (a partial file)."""
    from hubtool.formats import export

    real = export.write_safetensors_streamed

    def write(entries, produce, path, metadata=None):
        made: list[str] = []

        def failing(name):
            if made:
                raise exc
            made.append(name)
            return produce(name)

        real(entries, failing, path, metadata=metadata)

    monkeypatch.setattr(export, "write_safetensors_streamed", write)


@pytest.mark.parametrize(
    "exc",
    [OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EDQUOT, "Disk quota exceeded")],
    ids=["enospc", "quota"],
)
def test_disk_full_is_one_line_and_leaves_nothing_complete_looking(tiny_models, tmp_path, monkeypatch, exc):
    """ENOSPC while writing -> HubtoolError (disk full); no temp folder; an older export stays intact."""
    ex = exported("llama", tiny_models("llama"), tmp_path / "x", formats=())
    out = tmp_path / "formats" / "hubtool"
    _fail_on_save(monkeypatch, exc)
    with pytest.raises(HubtoolError) as info:
        export_format(ex.loaded.model, ex.loaded.processor, ex.weights, SPEC, "hubtool", out, meta_for(ex))
    assert "disk full" in info.value.message and "\n" not in info.value.line()
    assert not out.exists() and list(out.parent.iterdir()) == []
    monkeypatch.undo()
    export_format(ex.loaded.model, ex.loaded.processor, ex.weights, SPEC, "hubtool", out, meta_for(ex))
    good = digests(out)
    _fail_on_save(monkeypatch, exc)
    with pytest.raises(HubtoolError):
        export_format(ex.loaded.model, ex.loaded.processor, ex.weights, SPEC, "hubtool", out, meta_for(ex))
    assert digests(out) == good
    assert [p.name for p in out.parent.iterdir()] == ["hubtool"]


def test_interrupted_export_leaves_no_partial_folder(tiny_models, tmp_path, monkeypatch):
    """Ctrl-C mid-write removes the temp folder; leftovers of a killed export are cleared by the next one."""
    import subprocess

    ex = exported("llama", tiny_models("llama"), tmp_path / "x", formats=())
    out = tmp_path / "formats" / "auto_round"
    _fail_on_save(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        export_format(ex.loaded.model, ex.loaded.processor, ex.weights, SPEC, "auto_round", out, meta_for(ex))
    assert list(out.parent.iterdir()) == []
    monkeypatch.undo()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = out.parent / f".auto_round.partial-{dead.pid}-0123abcd"
    (stale / "sub").mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    export_format(ex.loaded.model, ex.loaded.processor, ex.weights, SPEC, "auto_round", out, meta_for(ex))
    assert [p.name for p in out.parent.iterdir()] == ["auto_round"]


def test_unknown_format_and_mismatched_weights_are_refused(tiny_models, tmp_path):
    """A format name outside FORMATS is a HubtoolError; an IntWeight for a non-linear is a ValueError."""
    ex = exported("llama", tiny_models("llama"), tmp_path / "x", formats=())
    with pytest.raises(HubtoolError):
        export_format(ex.loaded.model, None, ex.weights, SPEC, "awq", tmp_path / "o", {})
    bad = {"model.norm": next(iter(ex.weights.values()))}
    with pytest.raises(ValueError):
        export_format(ex.loaded.model, None, bad, SPEC, "hubtool", tmp_path / "o", {})
    assert not (tmp_path / "o").exists()


# -- optimum ---------------------------------------------------------------------------------------
def test_optimum_quantizer_quantizes_and_exports(tiny_models, tmp_path):
    """HubtoolQuantizer is an OptimumQuantizer; from a path or a model, quantize() writes loadable formats."""
    from optimum.quantization_base import OptimumQuantizer

    from hubtool.integrations.optimum import HubtoolQuantizer
    from hubtool.runtime.int4linear import Int4Linear
    from hubtool.runtime.loader import load_quantized

    q = HubtoolQuantizer.from_pretrained(tiny_models("llama"))
    assert isinstance(q, OptimumQuantizer)
    one = q.quantize(tmp_path / "one", formats=("hubtool",))
    assert one == {"hubtool": tmp_path / "one"}
    model = load_quantized(tmp_path / "one", backend="reference")
    assert sum(isinstance(m, Int4Linear) for m in model.modules()) == 14
    two = HubtoolQuantizer.from_pretrained(q.model, processor=q.processor).quantize(
        tmp_path / "two", formats="auto_round,auto_gptq", group_size=64, sym=False
    )
    assert set(two) == {"auto_round", "auto_gptq"} and all(
        (p / "config.json").is_file() for p in two.values()
    )
    qc = json.loads((two["auto_round"] / "config.json").read_text())["quantization_config"]
    assert (qc["group_size"], qc["sym"]) == (64, False)
    with pytest.raises(HubtoolError):
        q.quantize(tmp_path / "bad", formats=("onnx",))


def test_optimum_cli_command_parses_and_runs(tiny_models, tmp_path, capsys):
    """REGISTER_COMMANDS gives `optimum-cli hubtool quantize SOURCE -o DIR`."""
    from optimum.commands.base import RootOptimumCLICommand
    from optimum.commands.optimum_cli import register_optimum_cli_subcommand

    from hubtool.integrations.optimum import REGISTER_COMMANDS

    root = RootOptimumCLICommand("optimum-cli")
    for command in REGISTER_COMMANDS:
        register_optimum_cli_subcommand(command, parent_command=root)
    out = tmp_path / "cli"
    args = root.parser.parse_args(["hubtool", "quantize", str(tiny_models("qwen2")), "-o", str(out)])
    args.func(args).run()
    assert "hubtool:" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "hubtool"
    args = root.parser.parse_args(["hubtool", "quantize", str(tmp_path / "nope"), "-o", str(out)])
    with pytest.raises(SystemExit) as info:
        args.func(args).run()
    assert info.value.code == 2 and "error:" in capsys.readouterr().err
