"""Publishing against a local Hub-compatible server with the real huggingface_hub client.

The client runs with Xet disabled (``constants.HF_HUB_DISABLE_XET``, read at import time, is patched) and
online (conftest sets ``HF_HUB_OFFLINE=1`` for the loading tests). Its retry back-off sleeps are patched
out so that fault tests stay fast.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import pytest
from huggingface_hub import constants

from hubtool import record as rec
from hubtool.errors import HubtoolError
from hubtool.stages.hub import upload
from hubtool.stages.revisions import default_tag
from tests.fake_run import make_run, mark_verified
from tests.hubserver import HubServer

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # in the client

TOKEN = "hf_TestSecretToken0123456789abcdef"
REPO = "acme/tiny-int4"


@pytest.fixture
def run(tmp_path) -> Path:
    make_run(tmp_path / "run", variants=1, formats=("auto_round", "auto_gptq"))
    return tmp_path / "run"


def _puts(hub: HubServer, since: int = 0) -> list[str]:
    """Object ids PUT to the LFS store (successfully) after request number ``since``."""
    return [
        p.rsplit("/", 1)[-1]
        for m, p, status in hub.state.requests[since:]
        if m == "PUT" and p.startswith("/lfs-upload/") and status == 200
    ]


def _lfs_oid_of(run: Path, rel: str) -> str:
    return rec.sha256_file(run / rel)


def test_publish_layout_refs_and_hashes(hub, run):
    result = upload(run, REPO, endpoint=hub.url)
    assert result.verified and result.repo_id == REPO and result.endpoint == hub.url
    repo = hub.state.repos[REPO]
    tag = default_tag()
    assert set(repo.branches) == {"main", "auto_gptq"}
    assert repo.tags == {tag: repo.branches["main"], f"{tag}-auto_gptq": repo.branches["auto_gptq"]}
    by_rev = {r.revision: r for r in result.revisions}
    assert by_rev["main"].format == "auto_round" and by_rev["auto_gptq"].format == "auto_gptq"
    assert (
        by_rev["main"].commit == repo.branches["main"]
        and by_rev["auto_gptq"].commit == repo.branches["auto_gptq"]
    )
    # every recorded file is on its revision, byte for byte
    record = rec.load(run)
    assert record.publish == result
    for r in result.revisions:
        fmt = next(f for f in record.variant(r.variant).formats if f.name == r.format)
        for f in fmt.files:
            data = hub.state.file_bytes(REPO, r.revision, Path(f.path).relative_to(fmt.path).as_posix())
            assert hashlib.sha256(data).hexdigest() == f.sha256
    # main holds the card (with the branch's commit id) and its chart; the branch holds no card
    card = hub.state.file_bytes(REPO, "main", "README.md").decode()
    assert card == (run / "card" / "README.md").read_text()
    assert by_rev["auto_gptq"].commit in card and 'revision="auto_gptq"' in card
    assert hashlib.sha256(hub.state.file_bytes(REPO, "main", "eval_chart.png")).hexdigest() == next(
        a.sha256 for a in record.card_assets if a.path.endswith("eval_chart.png")
    )
    assert "README.md" not in repo.commits[repo.branches["auto_gptq"]].files
    # weights went through LFS; small JSON files as regular files
    main_files = repo.commits[repo.branches["main"]].files
    assert main_files["model.safetensors"].lfs and main_files["config.json"].lfs is None


def test_rerun_with_nothing_changed_makes_no_commit(hub, run):
    upload(run, REPO, endpoint=hub.url)
    commits, n = hub.state.commits(REPO), len(hub.state.requests)
    again = upload(run, REPO, endpoint=hub.url)
    assert hub.state.commits(REPO) == commits
    assert hub.state.count("POST", r"/commit/") == 2  # the first run's two commits, nothing since
    assert _puts(hub, n) == []
    assert again.verified and [r.commit for r in again.revisions] == [
        r.commit for r in rec.load(run).publish.revisions
    ]


def test_changed_file_is_committed_again_and_tag_conflicts_are_refused(hub, run):
    upload(run, REPO, endpoint=hub.url, tag="v1")
    record = rec.load(run)
    # change one file of the auto_gptq export (and its record, as a re-export would)
    fmt = record.variant("int4").formats[1]
    cfg = run / fmt.path / "config.json"
    cfg.write_text(cfg.read_text().replace('"bits": 4', '"bits": 4, "note": "v2"'))
    fmt.files = rec.file_records(run / fmt.path, run)
    mark_verified(record)  # and verified again
    rec.save(record, run)
    with pytest.raises(HubtoolError, match="tag v1-auto_gptq already points"):
        upload(run, REPO, endpoint=hub.url, tag="v1")
    result = upload(run, REPO, endpoint=hub.url, tag="v2")
    assert result.verified
    gptq = hub.state.repos[REPO].branches["auto_gptq"]
    assert b'"note": "v2"' in hub.state.file_bytes(REPO, gptq, "config.json")
    assert hub.state.repos[REPO].tags["v2-auto_gptq"] == gptq != hub.state.repos[REPO].tags["v1-auto_gptq"]


def test_local_file_changed_after_the_record_is_refused(hub, run):
    (run / "formats" / "auto_gptq" / "config.json").write_text("{}\n")
    with pytest.raises(HubtoolError, match="changed since run.json recorded it"):
        upload(run, REPO, endpoint=hub.url)


def test_interrupted_lfs_upload_then_rerun_sends_only_what_is_missing(hub, run):
    weights = _lfs_oid_of(run, "formats/auto_round/model.safetensors")
    fault = hub.state.inject("PUT", f"/lfs-upload/{REPO}/{weights}", drop=True, times=100)
    with pytest.raises(HubtoolError) as info:
        upload(run, REPO, endpoint=hub.url)
    assert "lost the connection" in info.value.message and "re-run" in (info.value.hint or "")
    assert fault.hits == 6  # the client's first try and its five retries, all cut mid-body
    repo = hub.state.repos[REPO]
    assert weights not in repo.lfs
    assert repo.commits[repo.branches["main"]].files.keys() == {".gitattributes"}  # main not committed
    assert "auto_gptq" in repo.branches  # the branch made it before the cut
    fault.times = fault.hits  # the network is back
    stored, n = set(repo.lfs), len(hub.state.requests)
    result = upload(run, REPO, endpoint=hub.url)
    assert result.verified
    sent = _puts(hub, n)
    assert weights in sent and not set(sent) & stored  # only what was missing went over the wire
    assert hub.state.count("POST", r"/commit/auto_gptq") == 1  # the branch was not committed again


def test_a_dropped_connection_is_retried(hub, run):
    weights = _lfs_oid_of(run, "formats/auto_round/model.safetensors")
    fault = hub.state.inject("PUT", f"/lfs-upload/{REPO}/{weights}", drop=True, times=1)
    assert upload(run, REPO, endpoint=hub.url).verified
    assert fault.hits == 1


def test_server_error_on_commit_then_rerun(hub, run):
    hub.state.inject("POST", f"/api/models/{REPO}/commit/main", status=500, times=1)
    with pytest.raises(HubtoolError) as info:
        upload(run, REPO, endpoint=hub.url)
    assert "failed (500)" in info.value.message and "to main" in info.value.message
    assert "\n" not in info.value.line()
    n = len(hub.state.requests)
    assert upload(run, REPO, endpoint=hub.url).verified
    assert _puts(hub, n) == []  # the LFS objects were uploaded before the commit failed


def test_bad_token_is_a_401(hub, run, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_value_1234")
    with pytest.raises(HubtoolError) as info:
        upload(run, REPO, endpoint=hub.url)
    assert "401" in info.value.message and "hf_wrong_token_value_1234" not in info.value.line()
    assert REPO not in hub.state.repos


def test_no_token_at_all(hub, run, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubtoolError, match="no Hugging Face token"):
        upload(run, REPO, endpoint=hub.url)


def test_repo_owned_by_someone_else(hub, run):
    hub.state.add_user("hf_bob_token_000000000000", "bob")
    hub.state.create_repo("bob/tiny-int4")
    with pytest.raises(HubtoolError, match="already exists and belongs to bob"):
        upload(run, "bob/tiny-int4", endpoint=hub.url)
    with pytest.raises(HubtoolError, match="cannot create repos under carol"):
        upload(run, "carol/tiny-int4", endpoint=hub.url)
    assert hub.state.commits("bob/tiny-int4") == 1


def test_unreachable_endpoint(hub, run):
    with HubServer() as other:
        url = other.url  # a port nothing listens on once this server stops
    with pytest.raises(HubtoolError, match="lost the connection to http://127.0.0.1"):
        upload(run, REPO, endpoint=url)


def test_private_repo(hub, run):
    upload(run, REPO, endpoint=hub.url, private=True)
    assert hub.state.repos[REPO].private
    assert rec.load(run).publish.private


def test_token_never_leaks(hub, run, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    upload(run, REPO, endpoint=hub.url, token=TOKEN)
    hub.state.inject("POST", r"/commit/", status=503, times=10)
    (run / "card" / "README.md").unlink()
    record = rec.load(run)
    record.extras.setdefault("card", {})["description"] = "changed"
    rec.save(record, run)
    with pytest.raises(HubtoolError) as info:
        upload(run, REPO, endpoint=hub.url, token=TOKEN)
    monkeypatch.setenv("HF_TOKEN", TOKEN + "x")
    with pytest.raises(HubtoolError) as info401:
        upload(run, REPO, endpoint=hub.url)
    texts = {
        "logs": caplog.text,
        "card": (run / "card" / "README.md").read_text(),
        "record": (run / "run.json").read_text(),
        "errors": info.value.line() + info401.value.line(),
        "server card": hub.state.file_bytes(REPO, "main", "README.md").decode(),
    }
    for where, text in texts.items():
        assert TOKEN not in text, f"token leaked into {where}"
    assert "Bearer" not in caplog.text


def test_dry_run_writes_trees_and_uploads_nothing(hub, run, tmp_path):
    out = tmp_path / "dry"
    result = upload(run, REPO, endpoint=hub.url, dry_run=out)
    assert not hub.state.requests and not result.verified
    assert sorted(p.name for p in out.iterdir()) == [".hubtool-dry-run", "auto_gptq", "main"]
    assert (out / "main" / "README.md").is_file() and (out / "main" / "eval_chart.png").is_file()
    assert (out / "auto_gptq" / "model.safetensors").read_bytes() == (
        run / "formats" / "auto_gptq" / "model.safetensors"
    ).read_bytes()
    assert not (out / "auto_gptq" / "README.md").exists()
    assert rec.load(run).publish is None  # a dry run changes nothing in the record


def test_revisions_load_with_the_hub_client(hub, run, tmp_path):
    from huggingface_hub import snapshot_download

    upload(run, REPO, endpoint=hub.url)
    path = snapshot_download(REPO, revision="auto_gptq", endpoint=hub.url, cache_dir=tmp_path / "cache")
    got = Path(path) / "model.safetensors"
    assert got.read_bytes() == (run / "formats" / "auto_gptq" / "model.safetensors").read_bytes()
    assert re.fullmatch(r"[0-9a-f]{40}", Path(path).name)


def test_cli_upload_and_card(hub, run, tmp_path, capsys):
    from hubtool.cli import main

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with pytest.raises(SystemExit) as code:
            main(["upload", str(run), "--repo-id", REPO, "--endpoint", hub.url, "--tag", "cli-1"])
        assert code.value.code == 0
        assert "verified" in capsys.readouterr().out
        assert hub.state.repos[REPO].tags["cli-1"] == hub.state.repos[REPO].branches["main"]
        with pytest.raises(SystemExit) as code:
            main(["upload", str(run), "--repo-id", "not a repo id"])
        assert code.value.code == 2
        assert capsys.readouterr().err.strip().startswith("error: --repo-id")
        with pytest.raises(SystemExit) as code:
            main(["card", str(run), "--repo-id", "acme/other"])
        assert code.value.code == 0 and 'model_id = "acme/other"' in (run / "card" / "README.md").read_text()
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_cli_reads_hubtool_toml(hub, run, tmp_path, capsys, monkeypatch):
    from hubtool.cli import main

    (tmp_path / "hubtool.toml").write_text(
        f'repo_id = "{REPO}"\nendpoint = "{hub.url}"\ntag = "from-toml"\n[card]\ndescription = "Built by CI."\n'
    )
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with pytest.raises(SystemExit) as code:
            main(["upload", str(run), "--tag", "from-flag"])
        assert code.value.code == 0
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    repo = hub.state.repos[REPO]
    assert "from-flag" in repo.tags and "from-toml" not in repo.tags  # the flag overrides the file
    assert "Built by CI." in hub.state.file_bytes(REPO, "main", "README.md").decode()


def test_xet_without_xet_storage_gives_a_hint(hub, run, monkeypatch):
    pytest.importorskip("hf_xet")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    monkeypatch.setattr("hubtool.stages.hub.is_loopback", lambda endpoint: False)  # as if it were remote
    with pytest.raises(HubtoolError) as info:
        upload(run, REPO, endpoint=hub.url)
    assert "HF_HUB_DISABLE_XET=1" in (info.value.hint or "")


@pytest.mark.slow
def test_publish_command_end_to_end(hub, tiny_models, tmp_path, capsys):
    """`hubtool publish`: quantize (RTN) -> compare -> eval -> card -> upload, then a re-run that reuses it all."""
    from hubtool.cli import main

    src = tiny_models("llama")
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("- text: Say hi.\n  max_new_tokens: 6\n")
    run_dir = tmp_path / "run"
    argv = [
        "publish",
        str(src),
        "--repo-id",
        REPO,
        "-o",
        str(run_dir),
        "--endpoint",
        hub.url,
        "--method",
        "rtn",
        "--formats",
        "auto_round,hubtool",
        "--prompts",
        str(prompts),
        "--tasks",
        "ppl",
        "--limit",
        "2",
    ]
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with pytest.raises(SystemExit) as code:
            main(argv)
        assert code.value.code == 0, capsys.readouterr().err
        record = rec.load(run_dir)
        assert record.publish.verified and record.comparisons and record.evals
        assert record.command[:2] == ["hubtool", "quantize"] and "rtn" in record.command
        card = hub.state.file_bytes(REPO, "main", "README.md").decode()
        assert "## INT4 vs BF16" in card and "## Evaluation" in card and "Say hi." in card
        commits = hub.state.commits(REPO)
        with pytest.raises(SystemExit) as code:
            main(argv)
        assert code.value.code == 0
        assert hub.state.commits(REPO) == commits  # nothing changed, nothing committed
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_publish_reuses_a_finished_run_of_the_same_source(run, tmp_path):
    from hubtool.pipeline import publish

    def must_not_quantize(opts):
        raise AssertionError("quantize ran again")

    result = publish(
        "acme/tiny-chat", REPO, run_dir=run, dry_run=tmp_path / "dry", quantize_fn=must_not_quantize
    )
    assert [r.revision for r in result.revisions] == ["main", "auto_gptq"]
    assert (tmp_path / "dry" / "main" / "README.md").is_file()
    with pytest.raises(HubtoolError, match="holds a run of acme/tiny-chat, not of acme/other"):
        publish("acme/other", REPO, run_dir=run, dry_run=tmp_path / "dry", quantize_fn=must_not_quantize)


def test_a_local_endpoint_works_with_the_client_defaults(hub, run, monkeypatch):
    """Offline mode and Xet (both on here, as in the demo's process) do not apply to a server on this machine."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    assert upload(run, REPO, endpoint=hub.url).verified
    assert constants.HF_HUB_OFFLINE is True and constants.HF_HUB_DISABLE_XET is False  # restored


def test_offline_mode_refuses_a_remote_endpoint(run, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(HubtoolError, match="HF_HUB_OFFLINE is set"):
        upload(run, REPO, endpoint="https://hub.example.org")
