"""Nothing published names a local path: a model quantized from a folder on this machine is named in the card
and in every uploaded file by ``--base-model``, else hubtool.toml's ``[card] base_model``, else its folder
name alone; the calibration file, the prompts and their images by their file names.

One tiny model is quantized (opt-RTN, a local calibration file, local prompts) from folders whose names
carry ``MARKER``, then published to the local test Hub; the bytes of every file of every commit (safetensors
included) and every commit message are searched for the run's local paths.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from hubtool import record as rec
from hubtool.cli import main
from hubtool.errors import HubtoolError
from tests.fake_run import make_run
from tests.hubserver import HubServer

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

MARKER = "Zq7LocalMark"
TOKEN = "hf_NoLocalPathsToken0123456789abcdef"
BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def cli(capsys, *argv) -> tuple[int, str]:
    """Run the CLI in-process; (exit code, stderr). The root logger is restored afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in argv])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return exc.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_models):
    """A finished run (quantize with a local calibration file, compare with local prompts, eval) of a tiny
    Llama copied into a folder whose path carries MARKER; the paths it was made from."""
    home = tmp_path_factory.mktemp(f"{MARKER}-home")
    src = home / f"{MARKER}-models" / "tiny-llama-src"
    shutil.copytree(tiny_models("llama"), src)
    calib = home / f"{MARKER}-data" / "calib-notes.txt"
    calib.parent.mkdir()
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    prompts = home / f"{MARKER}-prompts" / "prompts.yaml"
    prompts.parent.mkdir()
    prompts.write_text("- text: Say hi.\n  max_new_tokens: 4\n", encoding="utf-8")
    run_dir = home / f"{MARKER}-runs" / "run"
    run_dir.parent.mkdir()
    quantize = ["--method", "opt-rtn", "--calib", calib, "--nsamples", "4", "--seqlen", "32"]
    steps = [
        ["quantize", src, "-o", run_dir, *quantize],
        ["compare", run_dir, "--prompts", prompts],
        ["eval", run_dir, "--tasks", "ppl", "--limit", "2", "--seqlen", "32"],
        ["verify", run_dir],
    ]
    root = logging.getLogger()
    handlers, level, sys_argv = root.handlers[:], root.level, sys.argv
    try:
        for argv in steps:
            sys.argv = ["hubtool", *map(str, argv)]  # what `hubtool quantize` records as its command
            with pytest.raises(SystemExit) as exc:
                main(sys.argv[1:])
            assert exc.value.code == 0, argv
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        sys.argv = sys_argv
    return SimpleNamespace(
        home=home, src=src, calib=calib, prompts=prompts, run_dir=run_dir, quantize=quantize
    )


@pytest.fixture
def world(made, tmp_path):
    """This test's own copy of the finished run (a card or an upload changes its record)."""
    run_dir = tmp_path / f"{MARKER}-copy" / "run"
    shutil.copytree(made.run_dir, run_dir)
    return SimpleNamespace(**{**vars(made), "run_dir": run_dir, "made_in": made.run_dir, "tmp": tmp_path})


def local_paths(w) -> list[str]:
    """Every local path of the run that must not be published."""
    paths = {
        w.src,
        w.src.parent,
        w.src.resolve(),
        w.calib,
        w.calib.parent,
        w.prompts,
        w.prompts.parent,
        w.run_dir,
        w.run_dir.parent,
        w.made_in,
        w.home,
        w.tmp,
        Path.home(),
        Path(tempfile.gettempdir()),
        Path(os.getcwd()),
    }
    return sorted({str(p) for p in paths} | {MARKER})


def published(hub: HubServer, repo_id: str) -> dict[str, bytes]:
    """Every file of every commit of ``repo_id`` (``commit:path``) and every commit message."""
    state = hub.state
    repo = state.repos[repo_id]
    out = {}
    for cid, commit in repo.commits.items():
        out[f"{cid}:<message>"] = f"{commit.title}\n{commit.message}".encode()
        for path, entry in commit.files.items():
            out[f"{cid}:{path}"] = state.objects[entry.lfs] if entry.lfs else state.blobs[entry.oid]
    return out


def assert_no_local_path(files: dict[str, bytes], paths: list[str]) -> None:
    """No file's bytes hold any of ``paths`` (as UTF-8, or JSON-escaped)."""
    found = []
    for name, data in files.items():
        for p in paths:
            needles = {p.encode(), p.replace("/", "\\/").encode()}
            if any(n in data for n in needles):
                found.append(f"{name}: {p}")
    assert not found, "local paths published:\n" + "\n".join(found)


def card_of(hub: HubServer, repo_id: str) -> tuple[dict, str]:
    """The published card's metadata and body."""
    text = hub.state.file_bytes(repo_id, "main", "README.md").decode()
    _, head, body = text.split("---\n", 2)
    return yaml.safe_load(head), body


def uploaded_names(hub: HubServer, repo_id: str) -> set[str]:
    """The file names in the repo's branches."""
    repo = hub.state.repos[repo_id]
    return {p for b in repo.branches.values() for p in repo.commits[b].files}


@pytest.mark.slow
def test_a_local_source_is_named_by_its_folder_and_no_local_path_is_published(hub, world, capsys):
    repo = "acme/local-folder-int4"
    code, err = cli(
        capsys,
        "publish",
        world.src,
        "--repo-id",
        repo,
        "-o",
        world.run_dir,
        "--endpoint",
        hub.url,
        *world.quantize,
        "--formats",
        "auto_round,auto_gptq,hubtool",
        "--prompts",
        world.prompts,
        "--tasks",
        "ppl",
        "--limit",
        "2",
    )
    assert code == 0, err
    assert {"main", "auto_gptq", "hubtool"} <= set(hub.state.repos[repo].branches)
    assert {"model.safetensors", "config.json", "tokenizer_config.json"} <= uploaded_names(hub, repo)
    assert_no_local_path(published(hub, repo), local_paths(world))
    meta, body = card_of(hub, repo)
    assert "base_model" not in meta and "base_model_relation" not in meta  # a folder is no Hub id
    assert "`tiny-llama-src` (a local folder)" in body
    assert "calib-notes.txt" in body  # the calibration file, by its name
    assert "hubtool quantize tiny-llama-src -o run" in body  # the command that reproduces it, path-free
    # the local record keeps the real paths: the stages rely on them
    record = rec.load(world.run_dir)
    assert record.source.name == str(world.src.resolve())
    assert record.variants[0].calibration.source == str(world.calib.resolve())


@pytest.mark.slow
def test_base_model_flag_names_the_source(hub, world, capsys, monkeypatch, tmp_path):
    repo = "acme/flag-int4"
    (tmp_path / "hubtool.toml").write_text('[card]\nbase_model = "acme/from-toml"\n')
    monkeypatch.chdir(tmp_path)
    code, err = cli(
        capsys,
        "publish",
        world.src,
        "--repo-id",
        repo,
        "-o",
        world.run_dir,
        "--endpoint",
        hub.url,
        *world.quantize,
        "--base-model",
        BASE,
    )
    assert code == 0, err
    assert_no_local_path(published(hub, repo), local_paths(world))
    meta, body = card_of(hub, repo)
    assert meta["base_model"] == BASE and meta["base_model_relation"] == "quantized"  # the flag wins
    assert f"quantization of [{BASE}](https://huggingface.co/{BASE})" in body
    assert "acme/from-toml" not in body and "tiny-llama-src" not in body
    assert f"hubtool quantize {BASE} -o run" in body


@pytest.mark.slow
def test_toml_base_model_names_the_source(hub, world, capsys, monkeypatch, tmp_path):
    repo = "acme/toml-int4"
    (tmp_path / "hubtool.toml").write_text(f'[card]\nbase_model = "{BASE}"\n')
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "upload", world.run_dir, "--repo-id", repo, "--endpoint", hub.url)
    assert code == 0, err
    assert_no_local_path(published(hub, repo), local_paths(world) + [str(tmp_path)])
    meta, body = card_of(hub, repo)
    assert meta["base_model"] == BASE and meta["base_model_relation"] == "quantized"
    assert f"quantization of [{BASE}](https://huggingface.co/{BASE})" in body
    # remembered: a later `hubtool card` without the file names it the same way
    monkeypatch.chdir(world.tmp)
    code, err = cli(capsys, "card", world.run_dir)
    assert code == 0, err
    assert f"[{BASE}](https://huggingface.co/{BASE})" in (world.run_dir / "card" / "README.md").read_text()


@pytest.mark.parametrize("value", ["not a repo", "org/na:me", "a/b/c", "org/x--y", "/home/me/models/x"])
@pytest.mark.parametrize("command", ["card", "upload", "publish"])
def test_bad_base_model_is_one_line(capsys, tmp_path, command, value):
    run_dir = tmp_path / "run"
    make_run(run_dir, variants=1, formats=("auto_round",))
    argv = {"card": [run_dir], "upload": [run_dir, "--repo-id", "acme/x"]}.get(
        command, [run_dir, "--repo-id", "acme/x", "-o", tmp_path / "out"]
    )
    code, err = cli(capsys, command, *argv, "--base-model", value)
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --base-model {value!r} is not a Hub repo id"), err
    assert not (run_dir / "card").exists()


def test_bad_base_model_in_hubtool_toml_is_one_line(capsys, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    make_run(run_dir, variants=1, formats=("auto_round",))
    (tmp_path / "hubtool.toml").write_text('[card]\nbase_model = "/home/me/models/x"\n')
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "card", run_dir)
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and "[card] base_model '/home/me/models/x' is not a Hub repo id" in lines[0], err


def _local_run(run_dir: Path, src: Path, kind: str = "dir") -> rec.RunRecord:
    """A fake finished run whose source, calibration file, prompt image and template live under MARKER."""
    record = make_run(run_dir, variants=2, formats=("auto_round", "hubtool"), vlm=True)
    record.source = rec.SourceInfo(
        kind=kind,
        name=str(src),
        gguf_file=src.name if kind == "gguf" else None,
        is_vlm=True,
        note=f"snapshot in {src}" if kind == "hub" else None,
    )
    if kind == "hub":
        record.source.name, record.source.note = "acme/tiny-chat", str(src)
    record.variants[1].calibration.source = str(src.parent / "data" / "calib-b.jsonl")
    record.variants[1].calibration.builtin = False
    record.comparisons[1].image_source = str(src.parent / "pics" / "cat.png")
    record.command = ["hubtool", "quantize", str(src), "-o", str(run_dir), "--calib", "builtin"]
    record.command += ["--calib", str(src.parent / "data" / "calib-b.jsonl")]
    rec.save(record, run_dir)
    return record


DUMP = """{{ record | tojson }}
{{ source | tojson }}
{{ extras | tojson }}
{{ metadata | tojson }}
{{ variants | tojson }}
{{ comparisons | tojson }}
{{ command }} {{ source_display }} {{ caveats | join(" ") }} {{ card_data }} {{ base_model }}
"""


@pytest.mark.parametrize("kind", ["dir", "gguf", "hub"])
def test_card_context_holds_no_local_path(tmp_path, kind):
    """Whatever a template prints (the whole record included), the card names no local path."""
    from hubtool.stages.card import render_card, write_card

    src = tmp_path / f"{MARKER}-models" / ("tiny.Q4_1.gguf" if kind == "gguf" else "tiny-src")
    run_dir = tmp_path / "run"
    _local_run(run_dir, src, kind)
    template = tmp_path / f"{MARKER}-tpl" / "dump.md.j2"
    template.parent.mkdir()
    template.write_text(DUMP)
    text = render_card(run_dir, template)
    assert MARKER not in text and str(tmp_path) not in text, text
    assert "calib-b.jsonl" in text and "cat.png" in text  # named by their file names
    if kind == "hub":
        assert "acme/tiny-chat" in text
    else:
        assert src.name in text
    card = write_card(run_dir)
    assert MARKER not in card.read_text() and str(tmp_path) not in card.read_text()
    record = rec.load(run_dir)  # the local record keeps its paths
    assert record.variants[1].calibration.source == str(src.parent / "data" / "calib-b.jsonl")


def test_hub_source_base_model_precedence(tmp_path):
    from hubtool.stages.card import card_metadata

    record = make_run(tmp_path / "run", variants=1, formats=("auto_round",))
    assert card_metadata(record).base_model == "acme/tiny-chat"
    record.extras["card"] = {"base_model": BASE}
    assert card_metadata(record).base_model == BASE
    assert card_metadata(record, {"base_model": "acme/other"}).base_model == "acme/other"
    record.source = rec.SourceInfo(kind="dir", name=str(tmp_path / "x" / "my-model"))
    record.extras = {}
    meta = card_metadata(record)
    assert meta.base_model is None and getattr(meta, "base_model_relation", None) is None
    assert meta.model_name == "my-model-int4"
    with pytest.raises(HubtoolError, match="is not a Hub repo id"):
        card_metadata(record, {"base_model": str(tmp_path)})


def test_upload_refuses_an_export_that_names_a_local_path(tmp_path):
    """An export written before hubtool kept paths out of them (or edited by hand) is not published."""
    import json

    from hubtool.stages.hub import upload

    src = tmp_path / f"{MARKER}-models" / "tiny-src"
    run_dir = tmp_path / "run"
    record = _local_run(run_dir, src)
    fmt = record.variants[0].formats[0]
    config = run_dir / fmt.path / "config.json"
    data = json.loads(config.read_text())
    data["quantization_config"]["calibration"] = {"source": record.variants[1].calibration.source}
    config.write_text(json.dumps(data))
    fmt.files = rec.file_records(run_dir / fmt.path, run_dir)
    rec.save(record, run_dir)
    with pytest.raises(HubtoolError) as info:
        upload(run_dir, "acme/x", dry_run=tmp_path / "dry")
    assert info.value.message.startswith(f"{config} names the local path {src.parent / 'data'}")
    assert "--overwrite" in info.value.hint and not (tmp_path / "dry").exists()


@pytest.mark.parametrize("kind", ["dir", "gguf", "hub"])
def test_repos_layout_publishes_no_local_path(hub, tmp_path, kind):
    """A repo per format (`--layout repos`): no file of any repo, no card (the whole record printed by a
    template included) and no commit message names a local path."""
    from hubtool.stages.hub import upload

    src = tmp_path / f"{MARKER}-models" / ("tiny.Q4_1.gguf" if kind == "gguf" else "tiny-src")
    run_dir = tmp_path / f"{MARKER}-runs" / "run"
    _local_run(run_dir, src, kind)
    template = tmp_path / f"{MARKER}-tpl" / "dump.md.j2"
    template.parent.mkdir()
    template.write_text(DUMP + '{% include "partials/revisions.md.j2" %}\n')
    result = upload(run_dir, "acme/x", endpoint=hub.url, layout="repos", template=template)
    repos = [r.repo_id for r in result.revisions]
    assert sorted(hub.state.repos) == sorted(repos) and len(repos) == 4
    paths = sorted({str(tmp_path), str(src), str(run_dir), MARKER, str(Path.home())})
    for repo in repos:
        assert_no_local_path(published(hub, repo), paths)
        assert "## Siblings" in hub.state.file_bytes(repo, "main", "README.md").decode()
