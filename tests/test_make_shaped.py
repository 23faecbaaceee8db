"""scripts/make_shaped.py on a tiny version of each shape: complete index, loads and runs, seeded bytes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_shaped.py"
_spec = importlib.util.spec_from_file_location("make_shaped", SCRIPT)
ms = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ms)

TINY = dict(
    num_hidden_layers=2,
    hidden_size=256,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1024,
)
SHARD = 300_000  # bytes: the tiny model (~2.9 MB tied) spreads over about ten shards


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A function (preset, seed) -> the tiny model folder, built once per module."""
    cache: dict[tuple, Path] = {}

    def get(preset: str, seed: int = 0, tag: str = "") -> Path:
        if (preset, seed, tag) not in cache:
            out = tmp_path_factory.mktemp(f"{preset}-{seed}{tag}") / "model"
            cache[preset, seed, tag] = ms.make_shaped(
                preset, out, seed=seed, max_shard_size=SHARD, overrides=TINY
            )
        return cache[preset, seed, tag]

    return get


@pytest.mark.parametrize(("preset", "tied"), [("llama-3.2-3b", True), ("llama-3.1-8b", False)])
def test_index_maps_every_parameter_and_the_folder_runs(built, preset, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = built(preset)
    cfg = ms.make_config(preset, TINY)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)
    names = {n for n, _ in meta.named_parameters()}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == names
    assert ("lm_head.weight" in names) is not tied
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 5 and set(index["weight_map"].values()) == set(shards)
    total = 0
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            keys = set(f.keys())
            assert keys == {n for n, s in index["weight_map"].items() if s == shard}
            sizes = [f.get_slice(k).get_shape() for k in keys]
            for k in keys:
                assert f.get_slice(k).get_dtype() == "BF16"
            shard_bytes = sum(2 * torch.Size(s).numel() for s in sizes)
        assert shard_bytes <= SHARD or len(keys) == 1
        total += shard_bytes
    assert index["metadata"]["total_size"] == total == 2 * sum(p.numel() for p in meta.parameters())

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and model.config.vocab_size == 1024
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied
    w = model.model.layers[1].mlp.down_proj.weight.float()
    assert 0.018 < w.std().item() < 0.022 and abs(w.mean().item()) < 1e-3
    assert torch.equal(model.model.norm.weight, torch.ones(256, dtype=torch.bfloat16))
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) <= 1024 and tok.bos_token_id == model.config.bos_token_id == 0
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 1024) and torch.isfinite(logits).all()


def test_same_seed_same_bytes_other_seed_differs(built):
    a, again, other = built("llama-3.2-3b"), built("llama-3.2-3b", tag="again"), built("llama-3.2-3b", seed=1)
    assert _files(a) == _files(again)
    fa, fo = _files(a), _files(other)
    assert fa.keys() == fo.keys()
    shards = [n for n in fa if n.endswith(".safetensors")]
    assert all(fa[n] != fo[n] for n in shards)
    assert all(fa[n] == fo[n] for n in fa if n not in shards)  # config, index and tokenizer: the same


def test_shards_are_what_safetensors_writes(built, tmp_path):
    out = built("llama-3.2-3b")
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        save_file(tensors, tmp_path / shard.name, metadata={"format": "pt"})
        assert (tmp_path / shard.name).read_bytes() == shard.read_bytes()


def test_cli_refuses_a_non_empty_folder_and_bad_sizes(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert ms.main(["llama-3.2-3b", str(tmp_path), "--shape-override", "num_hidden_layers=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path} is not empty"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    with pytest.raises(SystemExit) as exc:
        ms.main(["llama-3.2-3b", str(tmp_path / "new"), "--max-shard-size", "5 parsecs"])
    assert exc.value.code == 2 and not (tmp_path / "new").exists()
    assert (
        ms.parse_size("5GB") == 5 * 10**9
        and ms.parse_size("2GiB") == 2 * 2**30
        and ms.parse_size("300") == 300
    )


def test_cli_writes_the_model_and_reports_peak_rss(tmp_path, capsys):
    args = [f"--shape-override={k}={v}" for k, v in TINY.items()]
    assert (
        ms.main(["llama-3.1-8b", str(tmp_path / "m"), "--seed", "3", "--max-shard-size", "1MB", *args]) == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("llama-3.1-8b: 0.00B parameters, 0.00 GB in 4 shards,")
    assert lines[1].startswith("wall ") and "peak RSS" in lines[1] and lines[1].endswith(" MiB")
    assert (tmp_path / "m" / "model-00004-of-00004.safetensors").exists()
