"""Every user error: one line on stderr, exit code 2, no traceback, nothing half-done left as finished."""

from __future__ import annotations

import errno
import json
import shutil

import httpx2 as httpx
import pytest

from hubtool import record
from hubtool.cli import main


def run_cli(capsys, *argv):
    """Run the CLI in-process; return (exit code, stderr)."""
    capsys.readouterr()  # drop what fixtures printed
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    err = capsys.readouterr().err
    return exc.value.code, err


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err  # one error line, the last thing printed
    assert "Traceback" not in err
    for n in needles:
        assert n in errors[0], errors[0]


def test_source_not_found(capsys, tmp_path):
    code, err = run_cli(capsys, "quantize", str(tmp_path / "missing"), "-o", str(tmp_path / "run"))
    assert_one_line_error(code, err, "not found")
    assert not (tmp_path / "run").exists()


def test_not_a_model(capsys, tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("hi")
    code, err = run_cli(capsys, "quantize", str(tmp_path / "folder"), "-o", str(tmp_path / "run"))
    assert_one_line_error(code, err, "not a model folder")


@pytest.mark.parametrize(
    ("exc_name", "needle"),
    [("GatedRepoError", "gated"), ("RepositoryNotFoundError", "not found"), ("HTTP401", "not authorized")],
)
def test_hub_unauthorized_or_gated(capsys, tmp_path, monkeypatch, exc_name, needle):
    import huggingface_hub
    from huggingface_hub import errors

    response = httpx.Response(
        401 if exc_name == "HTTP401" else 403, request=httpx.Request("GET", "https://hub/x")
    )
    cls = errors.HfHubHTTPError if exc_name == "HTTP401" else getattr(errors, exc_name)

    def fake_download(*args, **kwargs):
        raise cls("denied", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    code, err = run_cli(capsys, "quantize", "some-org/some-model", "-o", str(tmp_path / "run"))
    assert_one_line_error(code, err, needle)


def _fake_model_dir(tmp_path, config):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return d


def test_unsupported_architecture(capsys, tmp_path):
    d = _fake_model_dir(tmp_path, {"model_type": "definitely_not_a_model", "architectures": ["X"]})
    code, err = run_cli(capsys, "quantize", str(d), "-o", str(tmp_path / "run"))
    assert_one_line_error(code, err, "unsupported architecture")


def test_remote_code_needs_flag(capsys, tmp_path):
    d = _fake_model_dir(tmp_path, {"model_type": "custom_thing", "auto_map": {"AutoConfig": "c.Config"}})
    code, err = run_cli(capsys, "quantize", str(d), "-o", str(tmp_path / "run"))
    assert_one_line_error(code, err, "--trust-remote-code")


@pytest.mark.parametrize(
    ("flag", "value", "needle"), [("--bits", "3", "--bits 3"), ("--group-size", "100", "group")]
)
def test_unsupported_spec(capsys, tmp_path, tiny_models, flag, value, needle):
    code, err = run_cli(
        capsys, "quantize", str(tiny_models("llama")), "-o", str(tmp_path / "run"), flag, value
    )
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "run").exists()


def test_run_dir_not_empty(capsys, tmp_path, tiny_models):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("mine")
    code, err = run_cli(capsys, "quantize", str(tiny_models("llama")), "-o", str(run), "--method", "rtn")
    assert_one_line_error(code, err, "not empty", "--overwrite")
    assert (run / "keep.txt").read_text() == "mine"


def test_corrupt_safetensors(capsys, tmp_path, tiny_models):
    d = tmp_path / "model"
    shutil.copytree(tiny_models("llama"), d)
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, err = run_cli(capsys, "quantize", str(d), "-o", str(tmp_path / "run"), "--method", "rtn")
    assert_one_line_error(code, err, "not a valid safetensors")


def test_pickle_weights_refused(capsys, tmp_path, tiny_models):
    d = tmp_path / "model"
    shutil.copytree(tiny_models("llama"), d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    code, err = run_cli(capsys, "quantize", str(d), "-o", str(tmp_path / "run"), "--method", "rtn")
    assert_one_line_error(code, err, "pickle")


def test_corrupt_gguf(capsys, tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    code, err = run_cli(capsys, "quantize", str(bad), "-o", str(tmp_path / "run"))
    assert_one_line_error(code, err, "not a valid GGUF")


def test_disk_full_leaves_no_finished_record(capsys, tmp_path, tiny_models, monkeypatch):
    import safetensors.torch

    model_dir = str(tiny_models("llama"))  # built before the disk "fills up"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    run = tmp_path / "run"
    code, err = run_cli(capsys, "quantize", model_dir, "-o", str(run), "--method", "rtn")
    assert_one_line_error(code, err, "disk full")
    assert not (run / record.RECORD_NAME).exists()
    assert not (run / "formats" / "hubtool" / "config.json").exists()
    # Once there is space again, the same command finishes the run (no flag, no circle of hints).
    monkeypatch.undo()
    code, err = run_cli(capsys, "quantize", model_dir, "-o", str(run), "--method", "rtn")
    assert code == 0, err
    assert (run / record.RECORD_NAME).is_file() and (run / "formats" / "hubtool" / "config.json").is_file()


def test_calib_with_rtn_rejected(capsys, tmp_path, tiny_models):
    code, err = run_cli(
        capsys,
        "quantize",
        str(tiny_models("llama")),
        "-o",
        str(tmp_path / "r"),
        "--method",
        "rtn",
        "--calib",
        "x.txt",
    )
    assert_one_line_error(code, err, "--calib")


def test_unknown_format_and_method(capsys, tmp_path, tiny_models):
    code, err = run_cli(
        capsys, "quantize", str(tiny_models("llama")), "-o", str(tmp_path / "r"), "--formats", "onnx"
    )
    assert_one_line_error(code, err, "onnx")
    code, err = run_cli(
        capsys, "quantize", str(tiny_models("llama")), "-o", str(tmp_path / "r"), "--method", "gptq"
    )
    assert_one_line_error(code, err, "gptq")


def test_record_missing_for_later_stage():
    with pytest.raises(Exception, match="no finished run"):
        record.load("/nonexistent-run")


def test_publish_empty_run_dir_is_refused(capsys, tmp_path, monkeypatch):
    """`-o "$RUN"` with RUN unset (flag or hubtool.toml) never means the current folder."""
    monkeypatch.chdir(tmp_path)
    argv = ["publish", "acme/tiny-chat", "--repo-id", "acme/x", "--dry-run", str(tmp_path / "dry")]
    code, err = run_cli(capsys, *argv, "-o", "")
    assert_one_line_error(code, err, "-o/--run-dir is empty")
    assert err.count("\n") == 1
    (tmp_path / "hubtool.toml").write_text('run_dir = ""\n')
    code, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, f"{tmp_path / 'hubtool.toml'}: run_dir is empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hubtool.toml"]


@pytest.mark.parametrize("command", ["upload", "publish"])
def test_unknown_layout_is_refused_before_any_work(capsys, tmp_path, monkeypatch, command):
    """`--layout` (flag or hubtool.toml) names revisions or repos; anything else is one line, nothing done."""
    monkeypatch.chdir(tmp_path)
    target = str(tmp_path / "run") if command == "upload" else "acme/tiny-chat"
    argv = [command, target, "--repo-id", "acme/x", "--dry-run", str(tmp_path / "dry")]
    code, err = run_cli(capsys, *argv, "--layout", "branches")
    assert_one_line_error(code, err, "--layout 'branches' is not a layout", "revisions, repos")
    (tmp_path / "hubtool.toml").write_text('layout = "repo"\n')
    code, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, f"{tmp_path / 'hubtool.toml'}: layout 'repo' is not a layout")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hubtool.toml"]
