"""`--layout repos`: a repo per format, each with its own card, grouped in one collection (local Hub server).

The client runs as in test_publish.py: Xet disabled, online, no retry back-off.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
import yaml

from hubtool import record as rec
from hubtool.errors import HubtoolError
from hubtool.stages.hub import upload
from hubtool.stages.revisions import check_layout, default_tag, plan_repos, repo_name
from tests.fake_run import make_run
from tests.hubserver import HubServer

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # in the client

TOKEN = "hf_TestSecretToken0123456789abcdef"
REPO = "acme/tiny-int4"
# the fake run's two variants are "int4-caliba" (the first) and "int4-calibb"
REPOS = [
    f"{REPO}-AutoRound",
    f"{REPO}-GPTQ",
    f"{REPO}-calibb-AutoRound",
    f"{REPO}-calibb-GPTQ",
]


@pytest.fixture
def run(tmp_path) -> Path:
    make_run(tmp_path / "run", variants=2, formats=("auto_round", "auto_gptq"))
    return tmp_path / "run"


def _meta(card: str) -> dict:
    """The YAML metadata block of a card."""
    head = card.split("---\n")[1]
    return yaml.safe_load(head)


def _section(card: str, start: str, end: str) -> str:
    return card[card.index(start) : card.index(end)]


def _main_files(hub: HubServer, repo: str) -> dict:
    r = hub.state.repos[repo]
    return r.commits[r.branches["main"]].files


def test_plan_names_each_format_and_variant():
    record = make_run_record()
    plan = plan_repos(record, REPO, tag="v1")
    assert [r.repo_id for r in plan] == REPOS
    assert {r.revision for r in plan} == {"main"} and {r.tag for r in plan} == {"v1"}
    assert [(r.variant, r.format) for r in plan][:2] == [
        ("int4-caliba", "auto_round"),
        ("int4-caliba", "auto_gptq"),
    ]
    # --default-format puts its repo first; names do not change with the order
    first = plan_repos(record, REPO, default_format="auto_gptq")
    assert [r.repo_id for r in first] == [REPOS[1], REPOS[0], *REPOS[2:]]
    assert repo_name(REPO, None, "hubtool") == f"{REPO}-hubtool"
    assert repo_name(REPO, None, "gguf") == f"{REPO}-GGUF"
    assert repo_name(REPO, "int4-my calib", "auto_gptq") == f"{REPO}-my-calib-GPTQ"
    with pytest.raises(HubtoolError, match="longer than the Hub's 96"):
        repo_name("acme/" + "x" * 90, None, "auto_round")
    assert check_layout(None) == "revisions"
    with pytest.raises(HubtoolError, match="--layout 'branches' is not a layout"):
        check_layout("branches")


def make_run_record() -> rec.RunRecord:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return make_run(Path(d) / "run", variants=2, formats=("auto_round", "auto_gptq"), weights_bytes=64)


def test_repos_files_cards_and_collection(hub, run):
    result = upload(run, REPO, endpoint=hub.url, layout="repos")
    assert result.verified and result.layout == "repos" and result.repo_id == REPO
    assert [r.repo_id for r in result.revisions] == REPOS
    assert sorted(hub.state.repos) == sorted(REPOS)  # ORG/NAME itself is not a repo in this layout
    record = rec.load(run)
    assert record.publish == result
    tag = default_tag()
    tables = set()
    for r in result.revisions:
        repo = hub.state.repos[r.repo_id]
        assert r.revision == "main" and r.commit == repo.branches["main"] and repo.tags == {tag: r.commit}
        fmt = next(f for f in record.variant(r.variant).formats if f.name == r.format)
        own = {Path(f.path).relative_to(fmt.path).as_posix(): f for f in fmt.files}
        files = _main_files(hub, r.repo_id)
        assert set(files) == {".gitattributes", "README.md", "eval_chart.png", *own}
        for path, f in own.items():  # the format's files, byte for byte
            assert hashlib.sha256(hub.state.file_bytes(r.repo_id, "main", path)).hexdigest() == f.sha256
        card = hub.state.file_bytes(r.repo_id, "main", "README.md").decode()
        meta = _meta(card)
        assert meta["base_model"] == "acme/tiny-chat" and meta["base_model_relation"] == "quantized"
        assert meta["model-index"][0]["name"] == r.repo_id.split("/")[1]
        mine, other = ("auto-round", "gptq") if r.format == "auto_round" else ("gptq", "auto-round")
        assert mine in meta["tags"] and other not in meta["tags"]  # its own format's tag alone
        acc = next(
            m["value"] for x in meta["model-index"][0]["results"] for m in x["metrics"] if m["type"] == "acc"
        )
        assert acc == (0.59312 if r.variant == "int4-caliba" else 0.60044)  # its own variant's results
        assert ("acme/calib-set" in (meta.get("datasets") or [])) == (r.variant == "int4-calibb")
        # siblings: every other repo of the set linked, this one named, not linked
        siblings = _section(card, "## Siblings", "## Usage")
        for other in REPOS:
            link = f"[{other}](https://huggingface.co/{other})"
            assert (link in siblings) == (other != r.repo_id), (r.repo_id, other)
        assert f"this repo (`{r.repo_id}`)" in siblings and "verified with" in siblings
        # usage: this repo, this format, no revision
        usage = _section(card, "## Usage", "## INT4 vs")
        assert f'model_id = "{r.repo_id}"' in usage and "revision" not in usage
        assert usage.count("```python") == 1
        assert ("gptqmodel" in usage) == (r.format == "auto_gptq")
        tables.add(_section(card, "## INT4 vs", "## Reproduce"))  # comparison and eval tables
        assert card == (run / "card" / "repos" / r.repo_id.split("/")[1] / "README.md").read_text()
    assert len(tables) == 1  # the same comparison and eval tables in every card
    # one collection, titled NAME, in ORG, holding exactly the set in the plan's order
    (slug,) = hub.state.collections
    assert slug == result.collection and slug.startswith("acme/tiny-int4-")
    assert hub.state.collections[slug].title == "tiny-int4"
    assert hub.state.collection_items(slug) == REPOS
    # the run's card is the first repo's
    assert (run / "card" / "README.md").read_text() == hub.state.file_bytes(
        REPOS[0], "main", "README.md"
    ).decode()


def test_rerun_makes_no_commit_and_no_duplicate_item(hub, run):
    first = upload(run, REPO, endpoint=hub.url, layout="repos")
    commits = {r: hub.state.commits(r) for r in REPOS}
    n = len(hub.state.requests)
    again = upload(run, REPO, endpoint=hub.url, layout="repos")
    assert again.verified and again.collection == first.collection
    assert [r.commit for r in again.revisions] == [r.commit for r in first.revisions]
    assert {r: hub.state.commits(r) for r in REPOS} == commits
    writes = [(m, p) for m, p, _ in hub.state.requests[n:] if m != "GET" and p != "/api/repos/create"]
    assert writes == []  # no commit, no LFS upload, no tag, no collection call that writes
    # a record that lost the slug finds the collection by its title; one deleted on the Hub is made again
    record = rec.load(run)
    record.publish.collection = None
    rec.save(record, run)
    assert upload(run, REPO, endpoint=hub.url, layout="repos").collection == first.collection
    assert len(hub.state.collections) == 1 and hub.state.collection_items(first.collection) == REPOS
    del hub.state.collections[first.collection]
    third = upload(run, REPO, endpoint=hub.url, layout="repos")
    assert third.collection != first.collection and hub.state.collection_items(third.collection) == REPOS
    assert {r: hub.state.commits(r) for r in REPOS} == commits


def test_items_added_by_hand_are_kept_and_missing_ones_added(hub, run):
    result = upload(run, REPO, endpoint=hub.url, layout="repos")
    slug = result.collection
    hub.state.create_repo("acme/notes")
    coll = hub.state.collections[slug]
    coll.items = [i for i in coll.items if i.item_id != REPOS[2]]  # one removed by hand
    from tests.hubserver import CollectionItem

    coll.items.append(CollectionItem("ab" * 12, "acme/notes", "model"))
    upload(run, REPO, endpoint=hub.url, layout="repos")
    assert sorted(hub.state.collection_items(slug)) == sorted([*REPOS, "acme/notes"])


def test_gate_refuses_an_unverified_format(hub, run):
    record = rec.load(run)
    record.verify = [v for v in record.verify if not (v.variant == "int4-calibb" and v.format == "auto_gptq")]
    rec.save(record, run)
    with pytest.raises(
        HubtoolError, match=r"not uploading format auto_gptq \(int4-calibb\): it was never verified"
    ):
        upload(run, REPO, endpoint=hub.url, layout="repos")
    assert not hub.state.repos and not hub.state.collections and not hub.state.requests
    result = upload(run, REPO, endpoint=hub.url, layout="repos", skip_verify=True)
    card = hub.state.file_bytes(REPOS[3], "main", "README.md").decode()
    assert f"* GPTQ (`int4-calibb`, `{REPOS[3]}`): not verified" in card
    assert result.verified  # the upload itself was checked


def test_a_failure_midway_leaves_no_repo_looking_complete(hub, run):
    hub.state.inject("POST", f"/api/models/{REPOS[1]}/commit/main", status=500, times=1)
    with pytest.raises(HubtoolError) as info:
        upload(run, REPO, endpoint=hub.url, layout="repos")
    assert "failed (500)" in info.value.message and REPOS[1] in info.value.message
    assert "README.md" in _main_files(hub, REPOS[0])  # the first repo is whole
    assert set(_main_files(hub, REPOS[1])) == {".gitattributes"}  # the failed one holds nothing of ours
    assert REPOS[2] not in hub.state.repos and not hub.state.collections  # no collection before all are in
    publish = rec.load(run).publish
    assert publish.layout == "repos" and not publish.verified
    n, first = len(hub.state.requests), hub.state.repos[REPOS[0]].branches["main"]
    result = upload(run, REPO, endpoint=hub.url, layout="repos")
    assert result.verified and hub.state.collection_items(result.collection) == REPOS
    assert hub.state.repos[REPOS[0]].branches["main"] == first
    assert hub.state.count("POST", rf"/api/models/{REPOS[0]}/commit/") == 1  # not committed again
    assert not [p for m, p, _ in hub.state.requests[n:] if m == "PUT" and REPOS[0] + "/" in p]


def test_collection_failure_is_one_line_and_rerun_finishes(hub, run):
    hub.state.inject("POST", r"/api/collections/.+/items", status=403, times=1)
    with pytest.raises(HubtoolError) as info:
        upload(run, REPO, endpoint=hub.url, layout="repos")
    assert "403" in info.value.message and "collection" in info.value.message
    assert not rec.load(run).publish.verified
    assert upload(run, REPO, endpoint=hub.url, layout="repos").verified


def test_private_repos_and_collection(hub, run):
    result = upload(run, REPO, endpoint=hub.url, layout="repos", private=True)
    assert all(hub.state.repos[r].private for r in REPOS)
    assert hub.state.collections[result.collection].private and result.private


def test_local_source_without_base_model_warns(hub, tmp_path, caplog):
    run = tmp_path / "gguf-run"
    make_run(run, variants=1, formats=("auto_round",), source_kind="gguf")
    caplog.set_level(logging.WARNING)
    upload(run, REPO, endpoint=hub.url, layout="repos")
    assert "no base_model" in caplog.text
    assert "base_model" not in _meta(hub.state.file_bytes(f"{REPO}-AutoRound", "main", "README.md").decode())
    upload(
        run,
        REPO,
        endpoint=hub.url,
        layout="repos",
        extras={"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        tag="v2",  # a changed card is a new commit: tags are never moved
    )
    meta = _meta(hub.state.file_bytes(f"{REPO}-AutoRound", "main", "README.md").decode())
    assert (
        meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        and meta["base_model_relation"] == "quantized"
    )
    (slug,) = hub.state.collections
    assert hub.state.collection_items(slug) == [f"{REPO}-AutoRound"]  # a set of one


def test_dry_run_writes_a_tree_per_repo(hub, run, tmp_path):
    out = tmp_path / "dry"
    result = upload(run, REPO, endpoint=hub.url, layout="repos", dry_run=out)
    assert not hub.state.requests and not result.verified and result.layout == "repos"
    names = [r.split("/")[1] for r in REPOS]
    assert sorted(p.name for p in out.iterdir()) == sorted([".hubtool-dry-run", *names])
    for repo, name in zip(REPOS, names, strict=True):
        card = (out / name / "README.md").read_text()
        assert f'model_id = "{repo}"' in card and "## Siblings" in card
        assert (out / name / "eval_chart.png").is_file() and (out / name / "model.safetensors").is_file()
    assert rec.load(run).publish is None
    # a later dry run in the other layout replaces these trees
    upload(run, REPO, endpoint=hub.url, dry_run=out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".hubtool-dry-run", "main", "auto_gptq", "int4-calibb-auto_round", "int4-calibb-auto_gptq"]
    )


def test_revisions_after_repos_is_today_layout(hub, run):
    upload(run, REPO, endpoint=hub.url, layout="repos")
    result = upload(run, REPO, endpoint=hub.url)
    assert result.layout == "revisions" and result.collection is None
    assert {r.repo_id for r in result.revisions} == {None}
    card = hub.state.file_bytes(REPO, "main", "README.md").decode()
    assert "## Revisions" in card and "## Siblings" not in card


def _cli(argv, capsys):
    from hubtool.cli import main

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as code:
            main(argv)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    out = capsys.readouterr()
    return code.value.code, out.out, out.err


def test_cli_layout_flag_and_toml(hub, run, tmp_path, capsys, monkeypatch):
    code, out, err = _cli(
        ["upload", str(run), "--repo-id", REPO, "--endpoint", hub.url, "--layout", "repos"], capsys
    )
    assert code == 0, err
    assert "collection" in out and "verified" in out
    slug = rec.load(run).publish.collection
    assert hub.state.collection_items(slug) == REPOS
    (tmp_path / "hubtool.toml").write_text(
        f'repo_id = "acme/other"\nendpoint = "{hub.url}"\nlayout = "repos"\n'
    )
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli(["upload", str(run)], capsys)
    assert code == 0, err
    assert "acme/other-GPTQ" in hub.state.repos and "acme/other" not in hub.state.repos
    code, out, err = _cli(
        ["upload", str(run), "--layout", "revisions"], capsys
    )  # the flag overrides the file
    assert code == 0, err
    assert set(hub.state.repos["acme/other"].branches) == {
        "main",
        "auto_gptq",
        "int4-calibb-auto_round",
        "int4-calibb-auto_gptq",
    }


def test_publish_passes_the_layout_to_the_upload(hub, run):
    from hubtool.pipeline import publish

    def must_not_quantize(opts):
        raise AssertionError("quantize ran again")

    result = publish(
        "acme/tiny-chat",
        REPO,
        run_dir=run,
        calibrations=["builtin", "acme/calib-set"],  # the fake run's two variants
        endpoint=hub.url,
        quantize_fn=must_not_quantize,
        layout="repos",
    )
    assert result.layout == "repos" and sorted(hub.state.repos) == sorted(REPOS)
    assert hub.state.collection_items(result.collection) == REPOS
