"""Not enough memory or disk for a streamed run: one line before any work, from the shard headers (issue 18 item 7)."""

from __future__ import annotations

import math

import pytest

from hubtool import source
from hubtool.stages.quantize import QuantizeOptions
from tests.test_one_line_errors import one_line, run_cli


def _sizes(model_dir) -> tuple[int, int, int]:
    """(largest decoder block, largest tensor outside the blocks, all) in elements, read independently."""
    from safetensors import safe_open

    blocks: dict[str, int] = {}
    other = total = 0
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        for k in f.keys():
            n = math.prod(f.get_slice(k).get_shape())
            total += n
            if ".layers." in k:
                layer = k.split(".layers.")[1].split(".")[0]
                blocks[layer] = blocks.get(layer, 0) + n
            else:
                other = max(other, n)
    return max(blocks.values()), other, total


@pytest.mark.parametrize("method", ["rtn", "opt-rtn", "signround"])
def test_estimate_counts_the_largest_block_not_the_model(tiny_models, tmp_path, method):
    model = tiny_models("llama")
    block, other, total = _sizes(model)
    opts = QuantizeOptions(
        source=str(model), run_dir=str(tmp_path / "r"), method=method, nsamples=4, seqlen=64
    )
    est = source.estimate(source.locate(str(model)), opts, method)
    acts = 0 if method == "rtn" else 3 * 4 * 64 * 128 * 2  # 3 buffers x nsamples x seqlen x hidden x bf16
    assert est.block_params == block and est.other_params == other and est.params == total
    from hubtool.formats.export import COPY_CHUNK_BYTES

    other_bytes = min(2 * other, COPY_CHUNK_BYTES)  # a large embedding is read in blocks of rows, never whole
    want = source.BASE_BYTES + 2 * block * source.BLOCK_FACTOR[method] + other_bytes + acts
    assert est.memory == want


@pytest.mark.parametrize("method", ["rtn", "signround"])
def test_too_little_memory_is_refused_before_the_run_folder(
    capsys, tmp_path, tiny_models, monkeypatch, method
):
    model = tiny_models("llama")
    opts = QuantizeOptions(source=str(model), run_dir=str(tmp_path / "r"), method=method, iters=1)
    need = source.estimate(source.locate(str(model)), opts, method).memory
    monkeypatch.setattr(source, "available_memory", lambda: need - 1)
    run = tmp_path / "run"
    code, err = run_cli(capsys, "quantize", str(model), "-o", str(run), "--method", method, "--iters", "1")
    line = one_line(code, err, "needs about", "GiB of memory", "is available")
    assert "--nsamples" in line
    assert not run.exists()
    monkeypatch.setattr(source, "available_memory", lambda: need)  # just enough: it runs
    code, err = run_cli(capsys, "quantize", str(model), "-o", str(run), "--method", "rtn")
    assert code == 0, err


def test_too_little_disk_is_refused_before_the_run_folder(capsys, tmp_path, tiny_models, monkeypatch):
    model = tiny_models("llama")
    block, other, total = _sizes(model)
    opts = QuantizeOptions(source=str(model), run_dir=str(tmp_path / "r"), method="rtn")
    one = source.estimate(source.locate(str(model)), opts, "rtn", formats=1).disk
    three = source.estimate(source.locate(str(model)), opts, "rtn", formats=3).disk
    assert three > one > 0
    monkeypatch.setattr(source, "free_disk", lambda path: three - 1)
    run = tmp_path / "run"
    code, err = run_cli(capsys, "quantize", str(model), "-o", str(run), "--method", "rtn")
    one_line(code, err, "GB is free where the run folder goes", "choose another -o")
    assert not run.exists()
    code, err = run_cli(
        capsys, "quantize", str(model), "-o", str(run), "--method", "rtn", "--formats", "hubtool"
    )
    assert code == 0, err
    written = sum(p.stat().st_size for p in (run / "formats").rglob("*.safetensors"))
    assert written <= one  # the estimate covers what one export really writes


def test_memory_estimate_does_not_grow_with_depth(tmp_path):
    from tests import tiny

    ests = []
    for layers in (2, 6):
        folder = tiny.build_text_model("llama", tmp_path / f"l{layers}", layers=layers)
        opts = QuantizeOptions(source=str(folder), run_dir=str(tmp_path / "r"), method="signround")
        ests.append(source.estimate(source.locate(str(folder)), opts, "signround"))
    assert ests[1].params > ests[0].params and ests[1].disk > ests[0].disk
    assert ests[1].memory == ests[0].memory  # streamed: the largest block counts, not the depth
