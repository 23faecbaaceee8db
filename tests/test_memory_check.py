"""Not enough memory for the 16-bit weights and the calibration activations: one line before any work."""

from __future__ import annotations

import math

import pytest

from hubtool import source
from tests.test_one_line_errors import one_line, run_cli


def _need(model_dir) -> int:
    """The 16-bit model's bytes as its safetensors headers count them (what the check must at least ask)."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return sum(2 * math.prod(f.get_slice(k).get_shape()) for k in f.keys())


@pytest.mark.parametrize("method", ["rtn", "signround"])
def test_too_little_memory_is_refused_before_the_run_folder(
    capsys, tmp_path, tiny_models, monkeypatch, method
):
    model = tiny_models("llama")
    weights = _need(model)
    monkeypatch.setattr(source, "available_memory", lambda: weights - 1)  # one byte short of the weights
    run = tmp_path / "run"
    code, err = run_cli(capsys, "quantize", str(model), "-o", str(run), "--method", method, "--iters", "1")
    line = one_line(code, err, "needs about", "GiB of memory", "is available")
    assert "--nsamples" in line
    assert not run.exists()


def test_activations_count_for_calibrated_methods(capsys, tmp_path, tiny_models, monkeypatch):
    model = tiny_models("llama")
    weights = _need(model)
    acts = 3 * 4 * 64 * 128 * 2  # 3 buffers x nsamples x seqlen x hidden x bf16
    monkeypatch.setattr(source, "available_memory", lambda: weights + acts - 1)
    args = ["--nsamples", "4", "--seqlen", "64", "--iters", "1", "--batch-size", "2"]
    code, err = run_cli(
        capsys, "quantize", str(model), "-o", str(tmp_path / "a"), "--method", "opt-rtn", *args
    )
    one_line(code, err, "needs about")
    monkeypatch.setattr(source, "available_memory", lambda: weights + acts)  # just enough: it runs
    code, err = run_cli(capsys, "quantize", str(model), "-o", str(tmp_path / "b"), "--method", "rtn")
    assert code == 0, err
