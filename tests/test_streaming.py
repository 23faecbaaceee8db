"""Streaming (issue 18): a meta-device skeleton served from the source's shards gives the same model, the same
codes and the same export bytes as the model loaded whole, while holding one module's weights at a time."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from hubtool.core.lazy import lazy_weights
from hubtool.core.spec import QuantSpec
from hubtool.formats.export import export_format
from hubtool.quant.driver import quantize_model
from hubtool.quant.layers import plan_layers
from hubtool.quant.spec import make_recipe
from hubtool.source import load_source, locate

ARCHS = ("llama", "phi3", "qwen2", "gemma3", "llava")


def _load(folder: Path, stream: bool):
    return load_source(locate(str(folder)), dtype=torch.bfloat16, stream=stream)


@pytest.mark.parametrize("arch", ARCHS)
def test_skeleton_reads_the_same_tensors(tiny_models, arch):
    folder = tiny_models(arch)
    whole = _load(folder, stream=False).model
    lazy_model = _load(folder, stream=True).model
    lazy = lazy_weights(lazy_model)
    assert lazy is not None
    assert all(p.is_meta for p in lazy_model.parameters())  # nothing read yet
    with lazy.held(lazy_model):
        got = lazy_model.state_dict()
        want = whole.state_dict()
        assert sorted(got) == sorted(want)
        for k, v in want.items():
            assert got[k].dtype == v.dtype, k
            assert torch.equal(got[k], v), k
    assert all(p.is_meta for p in lazy_model.parameters())  # released again
    assert _tied(lazy_model) == _tied(whole)  # tied weights stay tied through reads and releases


def _tied(model) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return sorted(g for g in groups.values() if len(g) > 1)


@pytest.mark.parametrize("arch", ("llama", "gemma3"))
def test_forward_reads_module_by_module(tiny_models, arch):
    folder = tiny_models(arch)
    whole = _load(folder, stream=False).model
    lazy_model = _load(folder, stream=True).model
    ids = torch.randint(0, 500, (2, 12))
    peak = {"n": 0}

    def count(*_):
        live = sum(p.numel() for p in lazy_model.parameters() if not p.is_meta)
        peak["n"] = max(peak["n"], live)

    hooks = [m.register_forward_pre_hook(count) for m in lazy_model.modules()]  # after the lazy read
    with torch.no_grad():
        want = whole(input_ids=ids).logits
        got = lazy_model(input_ids=ids).logits
    for h in hooks:
        h.remove()
    assert torch.equal(got, want)
    assert all(p.is_meta for p in lazy_model.parameters())
    biggest = max(p.numel() for p in whole.parameters())
    total = sum(p.numel() for p in whole.parameters())
    assert biggest <= peak["n"] < total / 4  # one module's weights at a time, never the model's


@pytest.mark.parametrize("arch", ("llama", "gemma3"))
def test_the_embedding_reads_only_the_rows_asked_for(tiny_models, arch):
    folder = tiny_models(arch)
    whole = _load(folder, stream=False).model
    lazy_model = _load(folder, stream=True).model
    ids = torch.tensor([[5, 9, 9, 400, 17], [17, 3, 5, 5, 250]])
    seen = []
    emb = lazy_model.get_input_embeddings()
    hook = emb.register_forward_pre_hook(lambda m, a: seen.append(m.weight.shape[0]))  # after the lazy read
    with torch.no_grad():
        got = lazy_model.model(input_ids=ids).last_hidden_state
        want = whole.model(input_ids=ids).last_hidden_state
    hook.remove()
    assert seen == [len(torch.unique(ids))]  # the 6 rows asked for, not the vocabulary
    assert torch.equal(got, want)
    assert emb.weight.is_meta and emb.weight.shape == whole.get_input_embeddings().weight.shape
    assert emb.padding_idx == whole.get_input_embeddings().padding_idx


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(
    ("arch", "method"), [("llama", "rtn"), ("llava", "rtn"), ("qwen2", "opt-rtn"), ("phi3", "signround")]
)
def test_streamed_export_is_byte_identical(tiny_models, tmp_path, arch, method, one_thread, monkeypatch):
    from hubtool.formats import export

    monkeypatch.setattr(export, "COPY_CHUNK_BYTES", 3000)  # large 16-bit tensors copied in blocks of rows
    folder = tiny_models(arch)
    spec = QuantSpec(4, 32, True)
    recipe = make_recipe("light", iters=2, nsamples=4, seqlen=16, batch_size=2)
    digests = []
    for stream in (False, True):
        loaded = _load(folder, stream)
        plan = plan_layers(loaded.model, spec)
        calib = None
        if method != "rtn":
            from hubtool.quant.calib import load_calibration

            calib = load_calibration(
                None, loaded.processor, nsamples=4, seqlen=16, seed=0, is_vlm=loaded.info.is_vlm, batch_size=2
            )
        work = tmp_path / f"work-{stream}"
        result = quantize_model(loaded.model, plan, spec, method, recipe, calib, work_dir=work)
        out = tmp_path / f"out-{stream}"
        meta = {"method": method, "block_lists": plan.block_lists}
        for fmt in ("auto_round", "auto_gptq", "hubtool"):
            export_format(
                loaded.model,
                loaded.processor,
                result.weights,
                spec,
                fmt,
                out / fmt,
                meta,
                max_shard_size="200KB",
            )
        digests.append(_digests(out))
    assert len([n for n in digests[0] if n.endswith(".safetensors")]) > 3  # sharded
    assert digests[0] == digests[1]


def test_a_source_that_does_not_fit_is_placed_with_offload(tiny_models, tmp_path, monkeypatch):
    """compare/eval's 16-bit reference: when the weights exceed free memory, accelerate spreads them over
    the CPU and disk (device_map="auto"), and the logits stay those of the model loaded whole."""
    from hubtool import source

    folder = tiny_models("llama")
    ids = torch.randint(0, 500, (1, 10))
    whole = _load(folder, stream=False).model
    size = sum(p.numel() * 2 for p in whole.parameters())
    # free memory: the headroom plus a third of the weights, so that the rest must go to disk
    monkeypatch.setattr(source, "available_memory", lambda: source.OFFLOAD_HEADROOM + size // 3)
    offload = tmp_path / "offload"
    placed = load_source(locate(str(folder)), dtype=torch.bfloat16, offload=offload).model
    where = set(placed.hf_device_map.values())
    assert "disk" in where and any(p.is_meta for p in placed.parameters())
    # (transformers reads disk-offloaded safetensors weights from the source files: nothing is copied)
    with torch.no_grad():
        assert torch.equal(placed(input_ids=ids).logits, whole(input_ids=ids).logits)
    monkeypatch.setattr(source, "available_memory", lambda: source.OFFLOAD_HEADROOM + 2 * size)
    fits = load_source(locate(str(folder)), dtype=torch.bfloat16, offload=tmp_path / "unused").model
    assert not hasattr(fits, "hf_device_map") or set(fits.hf_device_map.values()) <= {"cpu", 0}
    assert not (tmp_path / "unused").exists()


def test_max_shard_size_shards_every_export(capsys, tiny_models, tmp_path):
    import json

    from tests.test_one_line_errors import one_line, run_cli

    model = str(tiny_models("llama"))
    run = tmp_path / "run"
    code, err = run_cli(
        capsys, "quantize", model, "-o", str(run), "--method", "rtn", "--max-shard-size", "100KB"
    )
    assert code == 0, err
    for fmt in ("auto_round", "auto_gptq", "hubtool"):
        folder = run / "formats" / fmt
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 2
        for shard in shards:  # a shard over the size holds one tensor larger than it
            many = sum(1 for f in index["weight_map"].values() if f == shard) > 1
            assert not many or (folder / shard).stat().st_size <= 100_000 + 8192, shard
    code, err = run_cli(capsys, "quantize", model, "-o", str(tmp_path / "bad"), "--max-shard-size", "lots")
    one_line(code, err, "--max-shard-size 'lots' is not a size")
    assert not (tmp_path / "bad").exists()
