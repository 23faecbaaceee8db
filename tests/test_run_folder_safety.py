"""The run folder of `hubtool quantize`: nothing outside hubtool's own output is ever deleted, a failed run
can always be retried, and --resume continues only a run that started from the same inputs.

Every refusal is checked by the listing and bytes of the folders involved, before and after.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from hubtool import record, rundir
from hubtool.cli import main
from hubtool.errors import HubtoolError
from tests import tiny

RTN = ["--method", "rtn", "--formats", "hubtool"]
# SignRound small enough for seconds on a tiny model; --calib builtin never looks for the Hub.
SIGNROUND = ["--recipe", "light", "--iters", "2", "--nsamples", "2", "--seqlen", "16", "--batch-size", "2"]
SIGNROUND += ["--calib", "builtin", "--formats", "hubtool"]


def run_cli(capsys, *argv):
    """Run the CLI in-process; return (exit code, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    return exc.value.code, capsys.readouterr().err


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err  # logs may precede
    for n in needles:
        assert n in errors[0], errors[0]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (and root itself): file bytes, or None for a folder."""
    out: dict[str, bytes | None] = {".": None}
    for p in sorted(Path(root).rglob("*")):
        out[p.relative_to(root).as_posix()] = None if p.is_dir() else p.read_bytes()
    return out


@pytest.fixture
def workspace(tmp_path, tiny_models):
    """tmp/m (a private copy of the tiny Llama) and tmp/notes.txt (a user's file beside it)."""
    shutil.copytree(tiny_models("llama"), tmp_path / "m")
    (tmp_path / "notes.txt").write_text("my notes\n")
    return tmp_path


# -- --overwrite never deletes what hubtool did not write -------------------------------------------
@pytest.mark.parametrize(
    ("output", "needle"),
    [
        ("m", "is the source"),
        ("link-to-m", "is the source"),  # a symlink to the source is the source
        (".", "holds the source"),  # the source's parent
        ("m/run", "is inside the source"),
    ],
)
def test_output_overlapping_the_source_is_refused(capsys, workspace, output, needle):
    (workspace / "link-to-m").symlink_to(workspace / "m")
    before = snapshot(workspace)
    out = workspace if output == "." else workspace / output
    code, err = run_cli(capsys, "quantize", workspace / "m", "-o", out, "--overwrite", *RTN)
    assert_one_line_error(code, err, needle)
    assert snapshot(workspace) == before


def test_empty_output_is_refused_not_read_as_the_cwd(capsys, workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    before = snapshot(workspace)
    code, err = run_cli(capsys, "quantize", workspace / "m", "-o", "", "--overwrite", *RTN)
    assert_one_line_error(code, err, "-o/--output is empty")
    code, err = run_cli(capsys, "quantize", workspace / "m", "-o", "  ", "--overwrite", *RTN)
    assert_one_line_error(code, err, "-o/--output is empty")
    assert snapshot(workspace) == before
    with pytest.raises(HubtoolError, match="empty"):
        rundir.output_path("")


@pytest.mark.parametrize(
    ("output", "needle"),
    [(".", "the current directory"), ("..", "a folder above the current directory"), ("/", "root")],
)
def test_cwd_root_and_their_parents_are_refused(capsys, workspace, monkeypatch, output, needle):
    (workspace / "cwd").mkdir()
    (workspace / "cwd" / "mine.txt").write_text("user data")
    monkeypatch.chdir(workspace / "cwd")
    before = snapshot(workspace)
    code, err = run_cli(capsys, "quantize", workspace / "m", "-o", output, "--overwrite", *RTN)
    assert_one_line_error(code, err, needle)
    assert snapshot(workspace) == before


def test_home_is_refused(capsys, workspace, monkeypatch):
    home = workspace / "home"
    home.mkdir()
    (home / ".bashrc").write_text("alias x=y\n")
    monkeypatch.setenv("HOME", str(home))
    before = snapshot(workspace)
    code, err = run_cli(capsys, "quantize", workspace / "m", "-o", home, "--overwrite", *RTN)
    assert_one_line_error(code, err, "the home directory")
    assert snapshot(workspace) == before


@pytest.mark.parametrize("fake_record", [False, True])
def test_a_folder_hubtool_did_not_make_is_never_cleared(capsys, workspace, fake_record):
    data = workspace / "data"
    data.mkdir()
    (data / "thesis.tex").write_text("chapter 1\n")
    if fake_record:  # another tool's run.json is not a hubtool record
        (data / "run.json").write_text(json.dumps({"epochs": 3}))
    before = snapshot(workspace)
    for flags in (["--overwrite"], [], ["--resume"]):
        code, err = run_cli(capsys, "quantize", workspace / "m", "-o", data, *flags, *RTN)
        assert_one_line_error(code, err, "holds no hubtool run")
    assert snapshot(workspace) == before


def _finished_run(capsys, workspace) -> Path:
    run = workspace / "run"
    code, err = run_cli(capsys, "quantize", workspace / "m", "-o", run, *RTN)
    assert code == 0, err
    assert (run / rundir.MARKER).is_file() and not (run / rundir.INCOMPLETE).exists()
    return run


def test_overwrite_checks_the_new_source_and_calibration_before_clearing(capsys, workspace):
    run = _finished_run(capsys, workspace)
    bad = workspace / "bad"
    shutil.copytree(workspace / "m", bad)
    (bad / "model.safetensors").write_bytes((bad / "model.safetensors").read_bytes()[:1000])
    before = snapshot(workspace)
    attempts = [
        ([workspace / "missing"], "not found"),
        ([bad], "not a valid safetensors"),
        ([workspace / "m", "--method", "signround", "--calib", workspace / "nope.txt"], "nope.txt"),
    ]
    for argv, needle in attempts:
        code, err = run_cli(capsys, "quantize", *argv, "-o", run, "--overwrite", "--formats", "hubtool")
        assert_one_line_error(code, err, needle)
        assert snapshot(workspace) == before  # the finished run.json and exports are intact


def test_overwrite_redoes_a_run_and_keeps_a_users_file_inside_it(capsys, workspace):
    run = _finished_run(capsys, workspace)
    (run / "my-prompts.yaml").write_text("- text: hi\n")
    old = json.loads((run / "run.json").read_text())
    code, err = run_cli(capsys, "quantize", workspace / "m", "-o", run, *RTN)
    assert_one_line_error(code, err, "already holds a finished run", "--overwrite")
    code, err = run_cli(capsys, "quantize", workspace / "m", "-o", run, "--overwrite", *RTN)
    assert code == 0, err
    assert json.loads((run / "run.json").read_text())["created_at"] >= old["created_at"]
    assert (run / "my-prompts.yaml").read_text() == "- text: hi\n"
    assert (workspace / "notes.txt").read_text() == "my notes\n"


# -- a failed run can always be retried -------------------------------------------------------------
def test_a_run_that_failed_before_its_first_block_reruns_plainly(capsys, workspace, monkeypatch):
    import hubtool.stages.quantize

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    run = workspace / "run"
    with monkeypatch.context() as m:
        m.setattr(hubtool.stages.quantize, "quantize_model", killed)
        code, _ = run_cli(capsys, "quantize", workspace / "m", "-o", run, *SIGNROUND)
    assert code == 130
    assert {p.name for p in run.iterdir()} == {rundir.MARKER, rundir.INCOMPLETE, rundir.WORK_DIR}
    assert rundir.state(run) == rundir.RETRY
    code, err = run_cli(capsys, "quantize", workspace / "m", "-o", run, *SIGNROUND)  # no flag needed
    assert code == 0, err
    assert record.load(run).variants[0].method == "signround"
    assert not (run / rundir.INCOMPLETE).exists() and not (run / rundir.WORK_DIR).exists()


def test_disk_full_then_the_same_command_again(capsys, workspace, monkeypatch):
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    run = workspace / "run"
    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", full)
        code, err = run_cli(capsys, "quantize", workspace / "m", "-o", run, *RTN)
    assert_one_line_error(code, err, "disk full")
    assert not (run / "run.json").exists()
    code, err = run_cli(capsys, "quantize", workspace / "m", "-o", run, *RTN)
    assert code == 0, err


def test_resume_on_nothing_to_resume_says_the_command_that_works(capsys, workspace):
    run = workspace / "run"
    code, err = run_cli(capsys, "quantize", workspace / "m", "-o", run, "--resume", *RTN)
    assert_one_line_error(code, err, "no interrupted run", "without --resume")
    assert not run.exists()
    code, err = run_cli(capsys, "quantize", workspace / "m", "-o", run, *RTN)
    assert code == 0, err
    code, err = run_cli(capsys, "quantize", workspace / "m", "-o", run, "--resume", *RTN)
    assert_one_line_error(code, err, "finished run", "--overwrite instead of --resume")
    code, err = run_cli(capsys, "quantize", workspace / "m", "-o", run, "--overwrite", "--resume", *RTN)
    assert_one_line_error(code, err, "exclude each other")


def test_unwritable_or_not_a_folder_output_is_one_line(capsys, workspace, monkeypatch):
    code, err = run_cli(capsys, "quantize", workspace / "m", "-o", workspace / "notes.txt", *RTN)
    assert_one_line_error(code, err, "is not a folder")
    code, err = run_cli(capsys, "quantize", workspace / "m", "-o", workspace / "notes.txt" / "run", *RTN)
    assert_one_line_error(code, err, "is a file, not a folder")

    def read_only(run_dir, note):
        raise OSError(errno.EROFS, "Read-only file system", str(run_dir))

    monkeypatch.setattr(rundir, "claim", read_only)
    code, err = run_cli(capsys, "quantize", workspace / "m", "-o", workspace / "ro", *RTN)
    assert_one_line_error(code, err, "Read-only file system", "writable -o")
    assert (workspace / "notes.txt").read_text() == "my notes\n"


# -- resume is bound to its inputs ------------------------------------------------------------------
def _interrupt_after_first_block(monkeypatch):
    """Make the next run stop (as SIGINT would) once block 0 is saved."""
    from hubtool.quant.workdir import WorkDir

    commit = WorkDir.commit

    def commit_then_stop(self, done):
        commit(self, done)
        raise KeyboardInterrupt

    monkeypatch.setattr(WorkDir, "commit", commit_then_stop)


def _interrupted_run(capsys, monkeypatch, source: Path, run: Path, *extra) -> dict:
    with monkeypatch.context() as m:
        _interrupt_after_first_block(m)
        code, _ = run_cli(capsys, "quantize", source, "-o", run, *SIGNROUND, *extra)
    assert code == 130
    assert rundir.state(run) == rundir.RESUMABLE and rundir.finished_blocks(run) == 1
    code, err = run_cli(capsys, "quantize", source, "-o", run, *SIGNROUND, *extra)
    assert_one_line_error(code, err, "interrupted run (1 blocks done)", "--resume")
    return snapshot(run)


def test_resume_with_another_source_of_the_same_shape_is_refused(capsys, tmp_path, monkeypatch):
    a = tiny.build_text_model("llama", tmp_path / "a", seed=0)
    b = tiny.build_text_model("llama", tmp_path / "b", seed=1)
    run = tmp_path / "run"
    before = _interrupted_run(capsys, monkeypatch, a, run)
    code, err = run_cli(capsys, "quantize", b, "-o", run, "--resume", *SIGNROUND)
    assert_one_line_error(
        code, err, f"cannot resume {run}: the source differs", str(a), str(b), "--overwrite"
    )
    assert snapshot(run) == before
    # the same folder, its weights replaced by another model's of the same shape
    shutil.copy(b / "model.safetensors", a / "model.safetensors")
    code, err = run_cli(capsys, "quantize", a, "-o", run, "--resume", *SIGNROUND)
    assert_one_line_error(code, err, "the source's weights differ from the interrupted run's", str(a))
    assert snapshot(run) == before
    # the way out the hint names works
    code, err = run_cli(capsys, "quantize", b, "-o", run, "--overwrite", *SIGNROUND)
    assert code == 0, err
    assert record.load(run).source.name == str(b)


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--group-size", "64", "the spec differs from the interrupted run's (group_size 128 -> 64)"),
        ("--iters", "3", "the recipe differs from the interrupted run's (iters 2 -> 3)"),
    ],
)
def test_resume_with_other_settings_is_refused(capsys, workspace, monkeypatch, flag, value, needle):
    run = workspace / "run"
    before = _interrupted_run(capsys, monkeypatch, workspace / "m", run)
    code, err = run_cli(capsys, "quantize", workspace / "m", "-o", run, "--resume", *SIGNROUND, flag, value)
    assert_one_line_error(code, err, needle)
    assert snapshot(run) == before


def test_resume_with_the_same_inputs_gives_the_same_bytes(capsys, workspace, monkeypatch):
    straight = workspace / "straight"
    code, err = run_cli(capsys, "quantize", workspace / "m", "-o", straight, *SIGNROUND)
    assert code == 0, err
    run = workspace / "run"
    _interrupted_run(capsys, monkeypatch, workspace / "m", run)
    inputs = json.loads((run / rundir.WORK_DIR / rundir.INPUTS).read_text())
    assert inputs["source"]["weights"] and inputs["recipe"]["iters"] == 2
    code, err = run_cli(capsys, "quantize", workspace / "m", "-o", run, "--resume", *SIGNROUND)
    assert code == 0, err
    a, b = snapshot(straight / "formats"), snapshot(run / "formats")
    assert a == b and any(k.endswith(".safetensors") for k in a)
    losses = [bl.tuned for bl in record.load(straight).variants[0].block_losses]
    assert [bl.tuned for bl in record.load(run).variants[0].block_losses] == losses


# -- the rules themselves ---------------------------------------------------------------------------
def test_own_names_follow_the_stages():
    from hubtool.stages import card, compare, evaluate

    assert {card.CARD_DIR, compare.IMAGES_DIR, evaluate.CACHE_DIR} <= set(rundir.OWN_NAMES)


def test_sampled_fingerprint_tells_large_files_apart(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "WHOLE_BELOW", 1024)
    monkeypatch.setattr(rundir, "CHUNK", 64)
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    data = bytes(range(256)) * 64
    a.write_bytes(data)
    b.write_bytes(data)
    assert rundir.fingerprint_file(a) == rundir.fingerprint_file(b)
    b.write_bytes(data[:-1] + b"\x00")  # the last chunk is always sampled
    assert rundir.fingerprint_file(a) != rundir.fingerprint_file(b)
    b.write_bytes(data + b"\x00")  # so is the size
    assert rundir.fingerprint_file(a) != rundir.fingerprint_file(b)
