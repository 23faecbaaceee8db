"""Publishing never loses a user's data and checks everything before its first remote write.

`upload --dry-run DIR` writes only into an empty, missing or hubtool-made folder; upload checks every file,
the card (templates include only hubtool's partials and the files the user named, rendering is bounded)
and the token before the repo exists; `publish` checks the Hub before quantizing and reuses a finished run
only when its spec matches. Every refusal is one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from hubtool import record as rec
from hubtool.cli import main
from tests.fake_run import make_run
from tests.hubserver import HubServer

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

TOKEN = "hf_SafetyTestToken0123456789abcdef"
REPO = "acme/tiny-int4"
MARKER = ".hubtool-dry-run"


@pytest.fixture
def run(tmp_path) -> Path:
    make_run(tmp_path / "run", variants=1, formats=("auto_round", "auto_gptq"))
    return tmp_path / "run"


@pytest.fixture
def quantize_calls(monkeypatch) -> list:
    """Replace the quantize stage (and the CLI's progress wrapper) by a recorder that must stay unused."""
    calls: list = []

    def record_call(opts, *args, **kwargs):
        calls.append(opts)
        raise AssertionError("quantize ran")

    monkeypatch.setattr("hubtool.pipeline.run_quantize", record_call)
    monkeypatch.setattr("hubtool.cli.quantize.run_with_progress", record_call, raising=False)
    return calls


def cli(capsys, *argv: str) -> tuple[int, str]:
    """Run the CLI in-process; (exit code, stderr). The root logger is restored afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as exc:
            main(list(argv))
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return exc.value.code, capsys.readouterr().err


def one_error(code: int, err: str, *needles: str) -> str:
    """Assert exit 2 and one error line, the last thing printed, holding every needle; return it."""
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def no_remote_writes(hub: HubServer) -> None:
    assert REPO not in hub.state.repos
    assert not [r for r in hub.state.requests if r[0] in ("POST", "PUT", "DELETE")]


# -- --dry-run DIR -----------------------------------------------------------------------------------
def test_dry_run_refuses_a_folder_holding_user_files(run, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "main").mkdir(parents=True)
    (out / "notes.txt").write_bytes(b"my notes\x00\xff")
    (out / "main" / "README.md").write_text("my own readme\n")
    before = snapshot(out)
    code, err = cli(capsys, "upload", str(run), "--repo-id", REPO, "--dry-run", str(out))
    one_error(code, err, f"--dry-run {out} is not empty and was not made by a hubtool dry run")
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["main", "notes.txt"]


@pytest.mark.parametrize("where", ["run", "parent", "formats", "card"])
def test_dry_run_refuses_the_run_folder_and_its_outputs(run, tmp_path, capsys, where):
    out = {
        "run": run,
        "parent": tmp_path,
        "formats": run / "formats" / "auto_gptq" / "dry",
        "card": run / "card" / "dry",
    }[where]
    before = snapshot(tmp_path)
    code, err = cli(capsys, "upload", str(run), "--repo-id", REPO, "--dry-run", str(out))
    one_error(code, err, f"--dry-run {out}", "run folder")
    assert snapshot(tmp_path) == before


def test_dry_run_into_its_own_earlier_output_replaces_the_trees(run, tmp_path, capsys):
    out = tmp_path / "dry"
    code, err = cli(
        capsys, "upload", str(run), "--repo-id", REPO, "--dry-run", str(out), "--default-format", "auto_gptq"
    )
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "auto_round", "main"]
    (out / "keep.txt").write_text("added by hand\n")
    code, err = cli(capsys, "upload", str(run), "--repo-id", REPO, "--dry-run", str(out))
    assert code == 0, err
    # the earlier trees (auto_round) are replaced, the hand-added file stays
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "auto_gptq", "keep.txt", "main"]
    assert json.loads((out / MARKER).read_text())["revisions"] == ["main", "auto_gptq"]
    fmt = run / "formats" / "auto_round"
    assert (out / "main" / "model.safetensors").read_bytes() == (fmt / "model.safetensors").read_bytes()
    assert (out / "keep.txt").read_text() == "added by hand\n"


def test_dry_run_with_a_broken_template_writes_nothing(run, tmp_path, capsys):
    tpl = tmp_path / "bad.md.j2"
    tpl.write_text("{{ nope.x }}\n")
    out = tmp_path / "dry"
    code, err = cli(
        capsys, "upload", str(run), "--repo-id", REPO, "--dry-run", str(out), "--template", str(tpl)
    )
    one_error(code, err, f"card template {tpl} line 1", "'nope' is undefined")
    assert not out.exists()


# -- templates: includes, links, bounds; all refused before the repo exists ---------------------------
def _upload_with(capsys, hub, run, tpl: Path, *more: str) -> tuple[int, str]:
    return cli(
        capsys, "upload", str(run), "--repo-id", REPO, "--endpoint", hub.url, "--template", str(tpl), *more
    )


def test_a_sibling_file_not_named_is_not_includable(hub, run, tmp_path, capsys):
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "secrets.env").write_text("API_KEY=abc\n")
    tpl = tmp_path / "tpl" / "card.md.j2"
    tpl.write_text("# card\n{% include 'secrets.env' %}\n")
    line = one_error(
        *_upload_with(capsys, hub, run, tpl), f"card template {tpl} line 2", "'secrets.env' refused"
    )
    assert "abc" not in line
    no_remote_writes(hub)


@pytest.mark.parametrize("target", ["tmpfile", "etc"])
def test_a_link_out_of_the_folder_is_refused(hub, run, tmp_path, capsys, target):
    outside = tmp_path / "outside" / "secret.txt"
    outside.parent.mkdir()
    outside.write_text("SECRET\n")
    if target == "etc" and not Path("/etc/hostname").is_file():
        pytest.skip("no /etc/hostname here")
    (tmp_path / "tpl").mkdir()
    os.symlink(outside if target == "tmpfile" else "/etc/hostname", tmp_path / "tpl" / "link.txt")
    tpl = tmp_path / "tpl" / "card.md.j2"
    tpl.write_text("{% include 'link.txt' %}\n")
    one_error(*_upload_with(capsys, hub, run, tpl), "'link.txt' refused")  # not named
    no_remote_writes(hub)
    # named in hubtool.toml, the link is still refused: it leads out of its folder
    (tmp_path / "hubtool.toml").write_text('[card]\nincludes = ["tpl/link.txt"]\n')
    code, err = _upload_with(capsys, hub, run, tpl, "--config", str(tmp_path / "hubtool.toml"))
    one_error(code, err, f"card include {tmp_path / 'tpl' / 'link.txt'} is a link to", "outside its folder")
    no_remote_writes(hub)


def test_dotdot_includes_are_refused(hub, run, tmp_path, capsys):
    (tmp_path / "x").write_text("SECRET\n")
    (tmp_path / "tpl").mkdir()
    tpl = tmp_path / "tpl" / "card.md.j2"
    tpl.write_text("{% include '../x' %}\n")
    one_error(*_upload_with(capsys, hub, run, tpl), "'../x' refused: paths with '..' are refused")
    no_remote_writes(hub)


def test_a_named_include_is_published(hub, run, tmp_path, capsys):
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "header.md").write_text("Built by the ACME team.\n")
    tpl = tmp_path / "tpl" / "card.md.j2"
    tpl.write_text(
        "---\n{{ card_data }}\n---\n{% include 'header.md' %}\n{% include 'partials/revisions.md.j2' %}\n"
    )
    (tmp_path / "hubtool.toml").write_text('[card]\nincludes = ["tpl/header.md"]\n')
    code, err = _upload_with(capsys, hub, run, tpl, "--config", str(tmp_path / "hubtool.toml"))
    assert code == 0, err
    card = hub.state.file_bytes(REPO, "main", "README.md").decode()
    gptq = hub.state.repos[REPO].branches["auto_gptq"]
    assert "Built by the ACME team." in card and f"| `{gptq}` |" in card  # the branch's real commit


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}\n{{ m(1) }}\n", "line 1: recursion too deep"),
        ("one\n{% include 'card.md.j2' %}\n", "line 2: recursion too deep"),
        ("{% for i in range(5000) %}{{ 'x' * 1000 }}{% endfor %}\n", "stopped, its output passed 1 MiB"),
        ("{{ 'x' * 10**10 }}\n", "stopped, it built a value longer than 1 MiB"),
        ("{{ 'x' | center(10**10) }}\n", "stopped, center() was asked for a width above 1 MiB"),
        ("{{ '%999999999d' % 1 }}\n", "stopped, a format field's width"),
    ],
)
def test_runaway_templates_stop_with_one_line(hub, run, tmp_path, capsys, source, needle):
    tpl = tmp_path / "card.md.j2"
    tpl.write_text(source)
    one_error(*_upload_with(capsys, hub, run, tpl), f"card template {tpl}", needle)
    no_remote_writes(hub)


def test_a_template_that_loops_silently_is_stopped_at_the_deadline(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("hubtool.stages.card_template.MAX_RENDER_SECONDS", 0.5)
    tpl = tmp_path / "card.md.j2"
    tpl.write_text("{% set r = range(100000) %}{% for a in r %}{% for b in r %}{% endfor %}{% endfor %}\n")
    one_error(
        *cli(capsys, "card", str(run), "--template", str(tpl)), "line 1: stopped, it ran longer than 0.5 s"
    )
    assert rec.load(run).extras.get("card_template") is None  # a failed template is not remembered


# -- upload: local files before the repo ------------------------------------------------------------
@pytest.mark.parametrize("fault", ["missing", "modified"])
def test_upload_checks_every_file_before_the_repo_exists(hub, run, capsys, fault):
    path = run / "formats" / "auto_gptq" / "model.safetensors"
    if fault == "missing":
        path.unlink()
    else:
        data = bytearray(path.read_bytes())
        data[-1] ^= 1  # same size, other bytes
        path.write_bytes(bytes(data))
    code, err = cli(capsys, "upload", str(run), "--repo-id", REPO, "--endpoint", hub.url)
    one_error(code, err, str(path), "missing" if fault == "missing" else "sha256 differs")
    assert not hub.state.requests  # not even the token was sent


# -- publish: the Hub before quantizing, reuse only with the same spec ------------------------------
def test_publish_with_a_bad_token_fails_before_quantizing(hub, tmp_path, capsys, monkeypatch, quantize_calls):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_value_1234")
    run_dir = tmp_path / "run"
    code, err = cli(
        capsys, "publish", "acme/tiny-chat", "--repo-id", REPO, "-o", str(run_dir), "--endpoint", hub.url
    )
    line = one_error(code, err, "rejected the token (401 Unauthorized) while checking the token")
    assert "hf_wrong_token_value_1234" not in err and TOKEN not in line
    assert not quantize_calls and not run_dir.exists() and not hub.state.repos


@pytest.mark.parametrize(
    ("endpoint", "needle"),
    [
        ("banana", "endpoint 'banana' is not an http(s) URL"),
        ("dead", "lost the connection to http://127.0.0.1"),
    ],
)
def test_publish_with_a_bad_endpoint_fails_before_quantizing(
    hub, tmp_path, capsys, quantize_calls, endpoint, needle
):
    if endpoint == "dead":
        with HubServer() as other:
            endpoint = other.url  # nothing listens there once it stops
    run_dir = tmp_path / "run"
    code, err = cli(
        capsys, "publish", "acme/tiny-chat", "--repo-id", REPO, "-o", str(run_dir), "--endpoint", endpoint
    )
    one_error(code, err, needle)
    assert not quantize_calls and not run_dir.exists()


def test_publish_to_a_namespace_not_yours_fails_before_quantizing(hub, tmp_path, capsys, quantize_calls):
    run_dir = tmp_path / "run"
    code, err = cli(
        capsys, "publish", "acme/tiny-chat", "--repo-id", "carol/x", "-o", str(run_dir), "--endpoint", hub.url
    )
    one_error(code, err, "user alice cannot create repos under carol")
    assert not quantize_calls and not run_dir.exists()


def _as_rtn(run: Path) -> None:
    """Turn the fake run into a finished RTN run (no recipe, no calibration)."""
    record = rec.load(run)
    record.spec["method"] = "rtn"
    for v in record.variants:
        v.method, v.recipe, v.calibration = "rtn", None, None
    rec.save(record, run)


def test_publish_refuses_to_reuse_a_run_made_otherwise(run, tmp_path, capsys, quantize_calls):
    _as_rtn(run)
    before = snapshot(run)
    argv = [
        "publish",
        "acme/tiny-chat",
        "--repo-id",
        REPO,
        "-o",
        str(run),
        "--dry-run",
        str(tmp_path / "dry"),
    ]
    code, err = cli(capsys, *argv, "--method", "signround", "--group-size", "64")
    line = one_error(
        code, err, f"{run} holds a finished run made otherwise", "method 'rtn' (asked 'signround')"
    )
    assert "group_size 128 (asked 64)" in line and "--overwrite" in line and "--run-dir" in line
    assert snapshot(run) == before and not quantize_calls and not (tmp_path / "dry").exists()


def test_publish_reuses_a_run_with_the_same_spec(run, tmp_path, capsys, quantize_calls):
    _as_rtn(run)
    out = tmp_path / "dry"
    argv = ["publish", "acme/tiny-chat", "--repo-id", REPO, "-o", str(run), "--dry-run", str(out)]
    code, err = cli(
        capsys, *argv, "--method", "rtn", "--group-size", "128", "--formats", "auto_gptq,auto_round"
    )
    assert code == 0, err
    assert f"reusing the finished run in {run} (same spec)" in " ".join(err.split())
    assert not quantize_calls and (out / "main" / "README.md").is_file()


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--recipe", "default"], "recipe 'light' (asked 'default')"),
        (["--iters", "200"], "iters 50 (asked 200)"),
        (["--formats", "auto_round"], "formats ['auto_gptq', 'auto_round'] (asked ['auto_round'])"),
        (
            ["--calib", "acme/other-set"],
            "calibration ['builtin:pydoc_data.topics'] (asked ['acme/other-set'])",
        ),
    ],
)
def test_publish_compares_recipe_formats_and_calibration(
    run, tmp_path, capsys, quantize_calls, flags, needle
):
    argv = [
        "publish",
        "acme/tiny-chat",
        "--repo-id",
        REPO,
        "-o",
        str(run),
        "--dry-run",
        str(tmp_path / "dry"),
    ]
    one_error(*cli(capsys, *argv, *flags), needle)
    assert not quantize_calls
    code, err = cli(
        capsys, *argv, "--recipe", "light", "--iters", "50", "--nsamples", "128", "--seqlen", "256"
    )
    assert code == 0, err  # the recipe the run recorded (light with seqlen 256)
