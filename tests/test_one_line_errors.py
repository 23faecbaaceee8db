"""Every error is one line with a fix (exit 2, no traceback), and the inputs of `hubtool quantize` are all
checked before the run folder exists: a bad config, weights that do not match it, no tokenizer, a malformed
Hub id, an absent device, an out-of-range setting or a missing calibration file leaves nothing behind.
Malformed records and prompt files, OS errors and interrupts get one line too.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hubtool import record, rundir
from hubtool.cli import main
from hubtool.cli.common import interrupted_line, os_error_line
from hubtool.errors import HubtoolError
from hubtool.formats import export
from hubtool.stages.quantize import QuantizeOptions
from tests import fake_run, tiny

RTN = ["--method", "rtn", "--formats", "hubtool"]


def run_cli(capsys, *argv):
    """Run the CLI in-process; return (exit code, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    return exc.value.code, capsys.readouterr().err


def one_line(code, err, *needles, exit_code=2, after_work=False) -> str:
    """Assert stderr is exactly one line, an error naming ``needles`` (no blank line, no log); return it.

    ``after_work``: the error comes after a stage ran, so its logs and progress may precede the line (which
    is then the last one).
    """
    assert code == exit_code, err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    if after_work:
        lines = [ln for ln in lines if ln.strip()][-1:]
        assert sum(ln.startswith("error: ") for ln in err.splitlines()) == 1, err
    else:
        assert err.endswith("\n"), repr(err)
    assert len(lines) == 1 and lines[0].startswith("error: "), repr(err)
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def listing(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture
def model(tmp_path, tiny_models):
    """A private copy of the tiny Llama that a test may break."""
    d = tmp_path / "model"
    shutil.copytree(tiny_models("llama"), d)
    return d


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


# -- 1. the source, checked before the run folder is created ----------------------------------------
@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('{"model_type": "llama",', "is not valid JSON (line 2"),
        ("[1, 2]", "holds a JSON list, not an object"),
    ],
)
def test_config_not_a_json_object(capsys, tmp_path, model, text, needle):
    (model / "config.json").write_text(text + "\n")
    before = listing(model)
    code, err = run_cli(capsys, "quantize", model, "-o", tmp_path / "run", *RTN)
    one_line(code, err, str(model / "config.json"), needle)
    assert not (tmp_path / "run").exists()
    assert listing(model) == before


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"hidden_size": 256, "intermediate_size": 512}, "is [512, 128] in the weights but [512, 256]"),
        ({"num_hidden_layers": 3}, "they lack 9 tensor(s) the config implies (e.g. model.layers.2."),
        ({"num_hidden_layers": 1}, "they hold 9 tensor(s) the config has no place for (e.g. model.layers.1."),
    ],
)
def test_config_shapes_do_not_match_the_weights(capsys, tmp_path, model, changes, needle):
    _edit_config(model, **changes)
    code, err = run_cli(capsys, "quantize", model, "-o", tmp_path / "run", *RTN)
    one_line(code, err, "config.json does not match the weights", needle, "use the config.json saved")
    assert not (tmp_path / "run").exists()


def test_no_tokenizer_files(capsys, tmp_path, model):
    for p in model.glob("tokenizer*"):
        p.unlink()
    code, err = run_cli(capsys, "quantize", model, "-o", tmp_path / "run", *RTN)
    one_line(code, err, "has no tokenizer files", "tokenizer.json")
    assert not (tmp_path / "run").exists()


def test_config_without_weights_and_index_without_shards(capsys, tmp_path, model):
    weights = model / "model.safetensors"
    weights.rename(model / "model-00001-of-00002.safetensors")
    index = {
        "metadata": {},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    code, err = run_cli(capsys, "quantize", model, "-o", tmp_path / "run", *RTN)
    one_line(code, err, "lists model-00002-of-00002.safetensors, which is not in")
    for p in model.glob("*.safetensors*"):
        p.unlink()
    code, err = run_cli(capsys, "quantize", model, "-o", tmp_path / "run", *RTN)
    one_line(code, err, "has config.json but no *.safetensors weights")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("repo_id", ["org/na:me", "org/a b", "org/x--y"])
def test_hub_id_refused_before_any_download(capsys, tmp_path, monkeypatch, repo_id):
    import huggingface_hub

    def download(*args, **kwargs):
        raise AssertionError("no download may start for a malformed id")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    code, err = run_cli(capsys, "quantize", repo_id, "-o", tmp_path / "run")
    one_line(code, err, f"{repo_id!r} is neither a local path nor a valid Hub id")
    assert not (tmp_path / "run").exists()


def _two_gpus(monkeypatch):
    """Pretend this machine has two CUDA devices (the check only asks torch how many there are)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize(
    ("flags", "gpus", "needle"),
    [
        (["--device", "banana"], False, "--device 'banana' is not a device"),
        (["--device", "cuda:3"], True, "--device cuda:3: this machine has 2 cuda devices"),
        (
            ["--device-map", "cuda:0,cuda:5"],
            True,
            "--device-map entry cuda:5: this machine has 2 cuda devices",
        ),
        (["--device-map", "cuda:0,banana"], True, "--device-map entry 'banana' is not a device"),
        (
            ["--device-map", "cuda:0"],
            False,
            "--device-map entry cuda:0 asked for, but this machine has no cuda",
        ),
    ],
)
def test_absent_device(capsys, tmp_path, monkeypatch, tiny_models, flags, gpus, needle):
    model = tiny_models("llama")
    if gpus:
        _two_gpus(monkeypatch)
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = run_cli(capsys, "quantize", model, "-o", tmp_path / "run", "--method", "rtn", *flags)
    one_line(code, err, needle)
    assert not (tmp_path / "run").exists()


def test_missing_calibration_file_and_bad_skip(capsys, tmp_path, tiny_models):
    model = tiny_models("llama")
    code, err = run_cli(capsys, "quantize", model, "-o", tmp_path / "run", "--calib", tmp_path / "nope.txt")
    one_line(code, err, "calibration source", "nope.txt' not found")
    (tmp_path / "notes.md").write_text("text")
    code, err = run_cli(capsys, "quantize", model, "-o", tmp_path / "run", "--calib", tmp_path / "notes.md")
    one_line(code, err, "calibration file notes.md has an unsupported type")
    code, err = run_cli(capsys, "quantize", model, "-o", tmp_path / "run", *RTN, "--skip", "(")
    one_line(code, err, "--skip '(' is not a valid regular expression")
    assert not (tmp_path / "run").exists()


def test_supported_sources_pass_the_checks(tmp_path, tiny_models):
    """No false alarm: every shipped tiny architecture, and an MoE whose experts transformers merges on load."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    from hubtool.source import preflight

    moe = tmp_path / "mixtral"
    cfg = MixtralConfig(
        vocab_size=tiny.VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(moe)
    tiny.make_tokenizer().save_pretrained(moe)
    for source in [tiny_models(a) for a in ("llama", "phi3", "qwen2", "gemma3", "llava")] + [moe]:
        opts = QuantizeOptions(source=str(source), run_dir=tmp_path / "run", calib=["builtin"])
        assert preflight(opts, "signround").name == str(Path(source).resolve())


# -- 2. ranges of the recipe; the record is strict JSON ---------------------------------------------
@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        (["--lr", "-5"], "--lr must be a finite number > 0, got -5.0"),
        (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
        (["--iters", "-1"], "--iters must be an integer >= 0, got -1"),
        (["--nsamples", "0"], "--nsamples must be an integer >= 1, got 0"),
        (["--seqlen", "1"], "--seqlen must be an integer >= 2, got 1"),
        (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
        (["--nsamples", "4", "--batch-size", "8"], "--batch-size 8 is larger than --nsamples 4"),
        (["--seed", "-1"], "--seed must be an integer from 0 to 4294967295, got -1"),
        (["--bits", "8"], "--bits 8 is not supported"),
        (["--group-size", "256"], "--group-size 256 is not supported"),
    ],
)
def test_out_of_range_settings(capsys, tmp_path, tiny_models, flags, needle):
    code, err = run_cli(capsys, "quantize", tiny_models("llama"), "-o", tmp_path / "run", *flags)
    one_line(code, err, needle)
    assert not (tmp_path / "run").exists()


def test_record_refuses_non_finite_numbers(tmp_path):
    run = fake_run.make_run(tmp_path / "run")
    text = record.to_json(run)
    run.variants[0].block_losses = [record.BlockLoss("model.layers.0", 0.5, float("nan"))]
    with pytest.raises(HubtoolError, match=r"not finite \(variants\[0\]\.block_losses\[0\]\.tuned = nan\)"):
        record.to_json(run)
    run.variants[0].block_losses = []
    run.timings["total"] = float("inf")
    with pytest.raises(HubtoolError, match=r"timings\.total = inf"):
        record.save(run, tmp_path / "run")
    assert (tmp_path / "run" / "run.json").read_text() == text  # the file on disk is untouched
    (tmp_path / "run" / "run.json").write_text(text.replace('"total": ', '"total": NaN, "x": ', 1))
    with pytest.raises(HubtoolError, match="holds NaN, which strict JSON does not allow"):
        record.load(tmp_path / "run")


# -- 3. a run.json of the wrong structure ------------------------------------------------------------
def _break(data: dict, how: str):
    if how == "list":
        return [data]
    if how == "no source":
        return {k: v for k, v in data.items() if k != "source"}
    if how == "variants not a list":
        return {**data, "variants": {"int4": 1}}
    if how == "size a string":
        data["variants"][0]["formats"][0]["files"][0]["size"] = "big"
        return data
    raise ValueError(how)


@pytest.mark.parametrize(
    ("how", "needle"),
    [
        ("list", "it holds a list, not an object"),
        ("no source", "no 'source' field"),
        ("variants not a list", "variants should be a list, not an object"),
        ("size a string", "variants[0].formats[0].files[0].size should be an integer, not a string"),
    ],
)
@pytest.mark.parametrize("command", ["card", "compare"])
def test_malformed_run_json(capsys, tmp_path, command, how, needle):
    run = tmp_path / "run"
    fake_run.make_run(run)
    path = run / record.RECORD_NAME
    path.write_text(json.dumps(_break(json.loads(path.read_text()), how)))
    before = listing(run)
    code, err = run_cli(capsys, command, run)
    one_line(code, err, f"{path} is not a valid run record: {needle}", "run the stage that wrote it")
    assert listing(run) == before


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["eval", "--tasks", "nosuch"], "unknown task 'nosuch'"),
        (["eval", "--tasks", "ppl", "--device", "banana"], "--device 'banana' is not a device"),
        (["compare", "--device", "banana"], "--device 'banana' is not a device"),
    ],
)
def test_eval_and_compare_refuse_before_any_work(capsys, tmp_path, argv, needle):
    """Checked first (the device too, even where every answer may be cached): the line and nothing else."""
    run = tmp_path / "run"
    fake_run.make_run(run)
    before = listing(run)
    code, err = run_cli(capsys, argv[0], run, *argv[1:])
    one_line(code, err, needle)
    assert listing(run) == before


# -- 4. prompts.yaml ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            "- text: hi\n  max_new_tokens: 5\n  max_new_tokens: 6\n",
            "line 3: duplicate key 'max_new_tokens' (first on line 2)",
        ),
        (
            "prompts:\n  - text: a\nprompts:\n  - text: b\n",
            "line 3: duplicate key 'prompts' (first on line 1)",
        ),
        ("- {text: a, text: b}\n", "line 1: duplicate key 'text'"),
        ("- text: a\n  image: [\n", "line 3: invalid YAML"),
        ("prompts: 5\n", "line 1: expected a non-empty list of prompts"),
        ("other: 1\n", "a mapping at the top needs a `prompts:` key"),
    ],
)
def test_bad_prompts_file(capsys, tmp_path, text, needle):
    run = tmp_path / "run"
    fake_run.make_run(run, variants=1)
    before = listing(run)
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(text)
    code, err = run_cli(capsys, "compare", run, "--prompts", prompts)
    one_line(code, err, f"{prompts} {needle}" if needle.startswith("line") else needle)
    assert listing(run) == before


def test_prompt_merge_keys_still_allowed(tmp_path):
    from hubtool.stages.prompts import load_prompts

    p = tmp_path / "p.yaml"
    p.write_text("base: &b {text: x, max_new_tokens: 3}\nprompts:\n  - <<: *b\n    text: y\n")
    (prompt,) = load_prompts(p, is_vlm=False)
    assert (prompt.text, prompt.max_new_tokens, prompt.line) == ("y", 3, 3)


# -- 5. OS errors and interrupts ---------------------------------------------------------------------
def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def test_read_only_output_folder(capsys, tmp_path, tiny_models):
    parent = tmp_path / "ro"
    parent.mkdir()
    if _is_root():  # root writes through 0o500: use a path under a file instead (ENOTDIR)
        (tmp_path / "file").write_text("mine")
        out, needle = tmp_path / "file" / "run", "is a file, not a folder"
    else:
        parent.chmod(0o500)
        out, needle = parent / "run", "read-only"
    try:
        code, err = run_cli(capsys, "quantize", tiny_models("llama"), "-o", out, *RTN)
    finally:
        parent.chmod(0o700)
    one_line(code, err, needle)
    assert list(parent.iterdir()) == []


@pytest.mark.parametrize("fault", ["EISDIR", "EROFS", "ENOSPC"])
def test_os_error_of_a_command_is_one_line(capsys, tmp_path, monkeypatch, fault):
    run = tmp_path / "run"
    fake_run.make_run(run, evals=False)
    card = run / "card" / "README.md"
    if fault == "EISDIR":
        card.mkdir(parents=True)  # a folder where the card file goes
    else:
        real = os.replace

        def replace(src, dst):
            if Path(dst) == card:
                raise OSError(getattr(errno, fault), os.strerror(getattr(errno, fault)), str(dst))
            return real(src, dst)

        monkeypatch.setattr(os, "replace", replace)
    code, err = run_cli(capsys, "card", run)
    line = one_line(code, err, "error: hubtool card failed: ", str(card))
    assert {"EISDIR": "give a file path", "EROFS": "writable file system", "ENOSPC": "free some space"}[
        fault
    ] in line
    assert not list(run.glob("card/.README.md.*.tmp"))


def test_other_os_errors_keep_their_traceback():
    """Only errors a user can fix become one line; anything else is a bug to report, traceback and all."""
    assert os_error_line(OSError(errno.EIO, "Input/output error", "/x"), "hubtool card") is None
    assert os_error_line(OSError(errno.ENOENT, "No such file or directory", "/x"), "hubtool card") is None
    line = os_error_line(OSError(errno.EROFS, "Read-only file system", "/x"), "hubtool upload")
    assert (
        line
        == "error: hubtool upload failed: /x: Read-only file system (hint: choose a location on a writable file system)"
    )


def test_disk_full_during_export_names_the_real_size(capsys, tmp_path, monkeypatch, tiny_models):
    model = str(tiny_models("llama"))
    done = tmp_path / "done"
    assert run_cli(capsys, "quantize", model, "-o", done, *RTN)[0] == 0
    from safetensors import safe_open

    with safe_open(str(done / "formats/hubtool/model.safetensors"), "pt") as f:
        size = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    want = f"needs about {export._size_text(size)} free"
    assert want != "needs about 0 B free"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    for target, name in ((export, "write_safetensors_streamed"), (export, "CheckpointPlan")):
        with monkeypatch.context() as m:
            m.setattr(target, name, full)  # the state dict built (then its bytes), or not yet (an estimate)
            code, err = run_cli(capsys, "quantize", model, "-o", tmp_path / name, *RTN)
        one_line(code, err, "disk full while writing the hubtool export", want, after_work=True)


def test_interrupt_line_names_the_resume_command(tmp_path):
    run = tmp_path / "run"
    args = ["quantize", "m", "-o", str(run), "--iters", "5", "--overwrite"]
    assert interrupted_line(args, signal.SIGINT) == (
        "interrupted before any block was saved; run the same command again to start over"
    )
    (run / rundir.WORK_DIR / "int4").mkdir(parents=True)
    (run / rundir.MARKER).write_text("")
    (run / rundir.INCOMPLETE).write_text("")
    (run / rundir.WORK_DIR / "int4" / "state.json").write_text('{"done": 1}')
    assert interrupted_line(args, signal.SIGTERM) == (
        f"terminated (SIGTERM): the finished blocks are saved; continue with: "
        f"hubtool quantize m -o {run} --iters 5 --resume"
    )
    assert interrupted_line(["-v", *args], signal.SIGINT).endswith(
        f"hubtool -v quantize m -o {run} --iters 5 --resume"
    )
    assert interrupted_line(["eval", str(run)], signal.SIGINT).startswith("interrupted: finished samples")


@pytest.mark.parametrize(
    ("sig", "code", "word"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated (SIGTERM)")],
)
def test_signal_during_quantize(tmp_path, tiny_models, sig, code, word):
    """A real process, signalled once its run folder exists: one line saying how to go on, exit 128+signal."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "hubtool", "quantize", str(tiny_models("llama")), "-o", str(run)]
    cmd += [
        "--iters",
        "100000",
        "--nsamples",
        "2",
        "--seqlen",
        "16",
        "--batch-size",
        "2",
        "--calib",
        "builtin",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        while not (run / rundir.INCOMPLETE).exists() and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1] == f"{word} before any block was saved; run the same command again to start over", err
    assert sum(word in ln for ln in lines) == 1, err
    assert rundir.state(run) == rundir.RETRY  # a plain rerun starts it over
    assert not (run / record.RECORD_NAME).exists()
