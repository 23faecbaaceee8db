"""Publish a run to the Hub: one revision per format, tags, the card on ``main``, then verify everything.

Layout: the default variant's default format (``auto_round`` when exported) goes to ``main`` with the
card; every other (variant, format) pair gets its own branch (``<format>``, or ``<variant>-<format>`` for
a variant other than the first) tagged ``<tag>-<branch>``; ``main`` is tagged ``<tag>``. Branches are
uploaded first so that the card can name their commits. Each revision is compared with what the repo
already holds (LFS sha256 / git blob id) and only what differs is committed, so a re-run with nothing
changed makes no commit and a re-run after an interrupted upload sends only what is missing. At the end
every ref is checked and every remote file's sha256 is compared with the record.

With ``layout="repos"`` (the Hub's release checklist) every (variant, format) pair gets a repo of its own
instead, named by ``revisions.plan_repos`` (``ORG/NAME-AutoRound``, ``ORG/NAME-GPTQ``, ...): its files, its
own card (``card.write_repo_cards``: ``base_model`` + ``base_model_relation: quantized``, the siblings) and
the card's chart and images go to its ``main`` in one commit, so a repo holds either all of it or none of
it; ``main`` is tagged. The cards name no commit, so they are rendered once, before the first upload. Once
every repo is verified, one collection (titled NAME, in ORG) is made, or found, and given the repos that
it lacks; the record keeps each repo with its commit and the collection's slug, which later runs reuse.

The token (``token=``, else ``HF_TOKEN`` or the login cache) never reaches a log line, the card, the record
or an error message. A file that names one of the run's local paths is refused before the first remote
write (``check_no_local_paths``); run.json, which keeps them, is never uploaded.
"""

from __future__ import annotations

import hashlib
import importlib
import ipaddress
import json
import logging
import os
import re
import shutil
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .. import record as rec
from ..__about__ import __version__
from ..errors import HubtoolError
from .revisions import branch_name, check_layout, default_tag, plan_layout

log = logging.getLogger(__name__)

KEEP_REMOTE = {".gitattributes"}
DRY_RUN_MARKER = ".hubtool-dry-run"  # in a folder a dry run made: a later dry run may replace its trees
PENDING_COMMIT = "0" * 40  # a branch's commit in the card rendered as a check, before the upload
COLLECTION_TITLE_MAX = 60  # the collection's title (the set's NAME) is cut to this: a cautious bound
COLLECTION_DESCRIPTION_MAX = 150  # the Hub's limit (huggingface_hub's create_collection)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass
class RevisionPlan:
    """One revision to publish: where it goes and which files (path in repo, local file, recorded hash)."""

    revision: rec.PublishedRevision
    files: list[tuple[str, Path, rec.FileRecord]] = field(default_factory=list)
    mirror: bool = True  # delete remote files that are not in ``files`` (branches hubtool owns)

    @property
    def size(self) -> int:
        """Bytes in this revision's files."""
        return sum(f.size for _, _, f in self.files)


def build_plan(
    record: rec.RunRecord,
    run_dir: Path,
    revisions: list[rec.PublishedRevision],
    *,
    card: bool = True,
    repo_cards: dict[str, rec.FileRecord] | None = None,
) -> list[RevisionPlan]:
    """The files of each revision: the format's files at the repo root, plus the card and its assets on main.

    A repo of the "repos" layout gets its own card (from ``repo_cards``) and the same assets.
    """
    plans = []
    for r in revisions:
        fmt = next(f for f in record.variant(r.variant).formats if f.name == r.format)
        files = [(_in_repo(f.path, fmt.path), run_dir / f.path, f) for f in fmt.files]
        if r.revision == "main" and card:
            from .card import CARD_DIR, CARD_NAME, card_files

            card_entries = [(_in_repo(f.path, CARD_DIR), run_dir / f.path, f) for f in card_files(record)]
            if r.repo_id is not None:
                readme = (repo_cards or {})[r.repo_id]
                assets = card_entries[1:] if record.card else card_entries
                card_entries = [(CARD_NAME, run_dir / readme.path, readme), *assets]
            taken = {p for p, _, _ in card_entries}
            clash = [p for p, _, _ in files if p in taken]
            if clash:
                log.warning("the card replaces the format's own %s on main", ", ".join(clash))
            files = [e for e in files if e[0] not in taken] + card_entries
        plans.append(RevisionPlan(r, files, mirror=r.revision != "main"))
    return plans


def _in_repo(path: str, base: str) -> str:
    return Path(path).relative_to(base).as_posix()


def check_local_files(plans: list[RevisionPlan]) -> None:
    """Refuse to publish files that are missing or differ from what the record says."""
    for plan in plans:
        for _, local, frec in plan.files:
            if not local.is_file():
                raise HubtoolError(
                    f"{local} is missing from the run folder", "re-run the stage that wrote it"
                )
            if local.stat().st_size != frec.size or rec.sha256_file(local) != frec.sha256:
                raise HubtoolError(
                    f"{local} changed since run.json recorded it (sha256 differs)",
                    "re-run the stage that wrote it (or `hubtool card` for the card) before uploading",
                )


# the files read whole to look for local paths (a safetensors file: its header); larger ones are not read
MAX_SCANNED_BYTES = 256 << 20


def check_no_local_paths(plans: list[RevisionPlan], record: rec.RunRecord, run_dir: Path) -> None:
    """Refuse to publish a file that names one of the run's local paths (the source, the calibration file,
    the run folder...): e.g. an export written before hubtool kept paths out of them."""
    from .public import local_paths

    run = Path(run_dir)
    paths = local_paths(record) + sorted({str(run.absolute()), str(run.resolve())}, key=len, reverse=True)
    needles = [(p, n) for p in paths if len(p) > 3 for n in {p.encode(), p.replace("/", "\\/").encode()}]
    for plan in plans:
        for path_in_repo, local, _ in plan.files:
            data = _scanned_bytes(local)
            hit = next((p for p, n in needles if n in data), None)
            if hit is not None:
                raise HubtoolError(
                    f"{local} names the local path {hit}, which would be published "
                    f"({_where(plan.revision)}:{path_in_repo})",
                    "re-run `hubtool quantize ... --overwrite` with this hubtool: its exports name no local path",
                )


def _scanned_bytes(path: Path) -> bytes:
    """What ``check_no_local_paths`` reads of a file: a safetensors header, a file up to MAX_SCANNED_BYTES."""
    with open(path, "rb") as f:
        if path.suffix == ".safetensors":
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            return f.read(min(n, MAX_SCANNED_BYTES))
        return f.read(MAX_SCANNED_BYTES) if path.stat().st_size <= MAX_SCANNED_BYTES else b""


def _where(r: rec.PublishedRevision) -> str:
    """How a message names a revision: its branch, or REPO@main for a repo of the "repos" layout."""
    return f"{r.repo_id}@{r.revision}" if r.repo_id else r.revision


def describe_plan(plans: list[RevisionPlan], repo_id: str) -> list[str]:
    """One line per revision: revision, tag, format, variant, file count and size."""
    lines = []
    for p in plans:
        r = p.revision
        lines.append(
            f"{r.repo_id or repo_id}@{r.revision}: {r.format} ({r.variant}), {len(p.files)} files, "
            f"{p.size / 2**20:.1f} MiB, tag {r.tag or '-'}" + (f", commit {r.commit}" if r.commit else "")
        )
    return lines


# -- upload ----------------------------------------------------------------------------------------
def upload(
    run_dir: Path,
    repo_id: str,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    private: bool = False,
    tag: str | None = None,
    dry_run: Path | None = None,
    template: Path | None = None,
    extras: dict[str, Any] | None = None,
    default_format: str | None = None,
    skip_verify: bool = False,
    layout: str | None = None,
) -> rec.PublishRecord:
    """Publish RUN_DIR to ``repo_id`` (branches and tags per format, card on main), verify, record it.

    ``layout="repos"``: a repo per format instead, ``repo_id`` naming the set (see the module docstring).
    A format without a passing `hubtool verify` result for its current files is refused (one line naming
    the format and the failing check) unless ``skip_verify``; the card then says it was not verified.

    Every check comes before the first remote write: each local file against the record, the card
    (rendered as it will be published, so a broken or unsafe template stops here), the token and the
    namespace. The card is rendered again once the branches' commits are known, since it names them.
    """
    run_dir = Path(run_dir)
    check_repo_id(repo_id)
    layout = check_layout(layout)
    record = rec.load(run_dir)
    if not record.variants or not any(v.formats for v in record.variants):
        raise HubtoolError(f"{run_dir} holds no exported format", "run `hubtool quantize` first")
    tag = tag or default_tag()
    extras = {**(extras or {}), **({"default_format": default_format} if default_format else {})}
    revisions = plan_layout(record, repo_id, layout, default_format=default_format, tag=tag)
    for r in revisions:
        if r.repo_id:
            check_repo_id(r.repo_id)
    check_local_files(build_plan(record, run_dir, revisions, card=False))
    check_no_local_paths(build_plan(record, run_dir, revisions, card=False), record, run_dir)
    if dry_run is not None:
        return _dry_run(run_dir, repo_id, revisions, Path(dry_run), template, extras, layout)
    if not skip_verify:
        check_verified(record, revisions)
    if layout == "repos":
        return _upload_repos(
            run_dir, repo_id, revisions, endpoint=endpoint, token=token, private=private, template=template,
            extras=extras,
        )  # fmt: skip

    from .card import check_card, write_card

    endpoint = _endpoint(endpoint)
    draft = [replace(r, commit=None if r.revision == "main" else PENDING_COMMIT) for r in revisions]
    check_card(
        run_dir,
        template,
        extras=extras,
        repo_id=repo_id,
        publish=rec.PublishRecord(repo_id, endpoint, private, draft, verified=False),
    )
    secret = _resolve_token(token)
    api = _api(endpoint, secret)
    step = _Step("connecting")
    with _client_mode(endpoint), _hub_errors(step, endpoint, repo_id, secret):
        step.now = "checking the token"
        user = api.whoami()
        _check_namespace(api, repo_id, user)
        step.now = f"creating {repo_id}"
        _ensure_repo(api, repo_id, private)
        main, branches = revisions[0], revisions[1:]
        branch_plans = build_plan(record, run_dir, branches, card=False)
        for plan in branch_plans:
            r = plan.revision
            step.now = f"uploading {r.format} ({r.variant}) to branch {r.revision}"
            r.commit = _sync_revision(
                api, repo_id, plan, f"hubtool {__version__}: {r.format} int4 ({r.variant})"
            )
            step.now = f"tagging {r.revision}"
            _ensure_tag(api, repo_id, r.tag, r.commit)

        record = rec.load(run_dir)
        record.publish = rec.PublishRecord(repo_id, endpoint, private, [main, *branches], verified=False)
        rec.save(record, run_dir)
        step.now = "rendering the card"
        write_card(run_dir, template, extras=extras, repo_id=repo_id)
        record = rec.load(run_dir)
        (main_plan,) = build_plan(record, run_dir, [main], card=True)
        check_local_files([main_plan])
        step.now = f"uploading {main.format} ({main.variant}) and the card to main"
        main.commit = _sync_revision(
            api,
            repo_id,
            main_plan,
            f"hubtool {__version__}: {main.format} int4 ({main.variant}) and model card",
        )
        step.now = "tagging main"
        _ensure_tag(api, repo_id, main.tag, main.commit)
        step.now = "verifying the upload"
        plans = [main_plan, *branch_plans]
        verify(api, repo_id, plans, endpoint=endpoint, token=secret)

    record = rec.load(run_dir)
    record.publish = rec.PublishRecord(
        repo_id,
        endpoint,
        private,
        [p.revision for p in plans],
        verified=True,
        at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    rec.save(record, run_dir)
    for line in describe_plan(plans, repo_id):
        log.info("published %s", line)
    return record.publish


def _upload_repos(
    run_dir: Path,
    repo_id: str,
    revisions: list[rec.PublishedRevision],
    *,
    endpoint: str | None,
    token: str | None,
    private: bool,
    template: Path | None,
    extras: dict[str, Any],
) -> rec.PublishRecord:
    """Layout "repos": upload each format to its own repo, verify them all, gather them in a collection.

    A repo's files, card and card assets go to its main in one commit, then main is tagged. The record gets
    the repos, their commits and the collection's slug.
    """
    from .card import check_card, write_card, write_repo_cards
    from .public import base_model

    endpoint = _endpoint(endpoint)
    record = rec.load(run_dir)
    old = record.publish
    known = (
        old.collection
        if old and old.layout == "repos" and old.repo_id == repo_id and old.endpoint == endpoint
        else None
    )
    draft = rec.PublishRecord(
        repo_id, endpoint, private, revisions, verified=False, layout="repos", collection=known
    )
    for r in revisions:  # every card, as it will be published, before the first remote write
        check_card(run_dir, template, extras=extras, repo_id=repo_id, publish=draft, repo=r.repo_id)
    if base_model(record, extras) is None:
        log.warning(
            "no base_model: the repos will not be linked to the model they quantize (pass --base-model)"
        )
    secret = _resolve_token(token)
    api = _api(endpoint, secret)
    step = _Step("connecting")
    with _client_mode(endpoint), _hub_errors(step, endpoint, repo_id, secret):
        step.now = "checking the token"
        user = api.whoami()
        for r in revisions:
            _check_namespace(api, str(r.repo_id), user)
        record = rec.load(run_dir)
        record.publish = draft
        rec.save(record, run_dir)
        step.now = "rendering the cards"
        write_card(run_dir, template, extras=extras, repo_id=repo_id)
        cards = write_repo_cards(run_dir, template, extras=extras, repo_id=repo_id)
        plans = build_plan(rec.load(run_dir), run_dir, revisions, card=True, repo_cards=cards)
        check_local_files(plans)
        for plan in plans:
            r, repo = plan.revision, str(plan.revision.repo_id)
            step.now, step.repo = f"creating {repo}", repo
            _ensure_repo(api, repo, private)
            step.now = f"uploading {r.format} ({r.variant}) and its card to {repo}"
            r.commit = _sync_revision(
                api, repo, plan, f"hubtool {__version__}: {r.format} int4 ({r.variant}) and model card"
            )
            step.now = f"tagging {repo}"
            _ensure_tag(api, repo, r.tag, r.commit)
        for plan in plans:
            step.now, step.repo = f"verifying {plan.revision.repo_id}", plan.revision.repo_id
            verify(api, str(plan.revision.repo_id), [plan], endpoint=endpoint, token=secret)
        step.now, step.repo = "gathering the repos in a collection", None
        slug = ensure_collection(
            api,
            repo_id,
            [str(p.revision.repo_id) for p in plans],
            private=private,
            known=known,
            description=f"int4 builds of {base_model(record, extras) or repo_id.split('/')[-1]}, "
            "one repo per format (hubtool)",
        )

    record = rec.load(run_dir)
    record.publish = replace(
        draft,
        revisions=[p.revision for p in plans],
        verified=True,
        at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        collection=slug,
    )
    rec.save(record, run_dir)
    for line in describe_plan(plans, repo_id):
        log.info("published %s", line)
    log.info("collection %s holds the %d repos", slug, len(plans))
    return record.publish


def ensure_collection(
    api: Any,
    repo_id: str,
    repos: list[str],
    *,
    private: bool = False,
    known: str | None = None,
    description: str | None = None,
) -> str:
    """The slug of the collection that holds ``repos``, made or found; only the repos it lacks are added.

    The collection is ``known`` (a recorded slug) if it still exists, else the one titled after ``repo_id``'s
    NAME in its ORG, made if missing. No item is ever removed (one added by hand stays).
    """
    from huggingface_hub.errors import HfHubHTTPError

    namespace, name = repo_id.split("/", 1)
    collection = None
    if known:
        try:
            collection = api.get_collection(known)
        except HfHubHTTPError as exc:
            if exc.response is None or exc.response.status_code != 404:
                raise
            log.info("collection %s is gone: making it again", known)
    if collection is None:
        collection = api.create_collection(
            name[:COLLECTION_TITLE_MAX],
            namespace=namespace,
            description=(description or "")[:COLLECTION_DESCRIPTION_MAX] or None,
            private=private,
            exists_ok=True,
        )
    slug = collection.slug
    held = {i.item_id for i in collection.items if i.item_type == "model"}
    for repo in repos:
        if repo not in held:
            log.info("adding %s to collection %s", repo, slug)
            api.add_collection_item(slug, repo, item_type="model", exists_ok=True)
    held = {i.item_id for i in api.get_collection(slug).items if i.item_type == "model"}
    missing = [r for r in repos if r not in held]
    if missing:
        raise HubtoolError(f"verify: collection {slug} does not hold {missing[0]}", "re-run the upload")
    others = sorted(held - set(repos))
    if others:
        log.info("collection %s also holds %s (kept)", slug, ", ".join(others))
    return slug


def check_verified(record: rec.RunRecord, revisions: list[rec.PublishedRevision]) -> None:
    """Refuse to upload a format that failed `hubtool verify` or was never verified (one line, the first)."""
    for r in revisions:
        why = rec.verify_problem(record, r.variant, r.format)
        if why:
            raise HubtoolError(
                f"not uploading format {r.format} ({r.variant}): {why}",
                "run `hubtool verify RUN_DIR` and fix the export, or pass --skip-verify (the card then says "
                "it was not verified)",
            )


def check_access(repo_id: str, *, endpoint: str | None = None, token: str | None = None) -> str:
    """Check the endpoint, the token (whoami) and that its user may write to ``repo_id``'s namespace; the user."""
    check_repo_id(repo_id)
    secret = _resolve_token(token)
    endpoint = _endpoint(endpoint)
    api = _api(endpoint, secret)
    with _client_mode(endpoint), _hub_errors(_Step("checking the token"), endpoint, repo_id, secret):
        user = api.whoami()
        _check_namespace(api, repo_id, user)
    return str(user.get("name"))


def check_repo_id(repo_id: str) -> None:
    """Refuse a --repo-id that is not ORG/NAME."""
    if not _REPO_ID.match(repo_id or ""):
        raise HubtoolError(f"--repo-id {repo_id!r} is not of the form ORG/NAME", "e.g. my-org/my-model-int4")


# -- dry run ---------------------------------------------------------------------------------------
def check_dry_run_dir(out: Path, run_dir: Path, record: rec.RunRecord | None = None) -> list[str]:
    """Refuse a --dry-run folder hubtool may not write into; the revision trees an earlier dry run left there.

    Allowed: a missing or empty folder, or one an earlier dry run made (it holds DRY_RUN_MARKER). Never the
    run folder, a folder that contains it, or one inside the run folder's outputs.
    """
    out, run_dir = Path(out), Path(run_dir)
    here, run = out.resolve(), run_dir.resolve()
    if here == run or run.is_relative_to(here):
        raise HubtoolError(
            f"--dry-run {out} is or contains the run folder {run_dir}",
            "choose a folder outside the run folder",
        )
    if here.is_relative_to(run):
        from .card import CARD_DIR

        outputs = {"formats", CARD_DIR, rec.RECORD_NAME}
        if record is not None:
            files = [f for v in record.variants for fmt in v.formats for f in fmt.files]
            files += ([record.card] if record.card else []) + list(record.card_assets)
            outputs |= {Path(f.path).parts[0] for f in files}
        top = here.relative_to(run).parts[0]
        if top in outputs:
            raise HubtoolError(
                f"--dry-run {out} is inside the run folder's {top}", "choose a folder outside the run folder"
            )
    if not out.exists():
        return []
    if not out.is_dir():
        raise HubtoolError(f"--dry-run {out} exists and is not a folder", "choose a new or empty folder")
    marker = out / DRY_RUN_MARKER
    if marker.is_file() and not marker.is_symlink():
        try:
            names = json.loads(marker.read_text(encoding="utf-8")).get("revisions", [])
        except (OSError, ValueError, AttributeError):
            names = []
        return [n for n in names if isinstance(n, str) and n == branch_name(n)]
    if any(out.iterdir()):
        raise HubtoolError(
            f"--dry-run {out} is not empty and was not made by a hubtool dry run (nothing was written)",
            "choose a new or empty folder",
        )
    return []


def _dry_run(
    run_dir: Path,
    repo_id: str,
    revisions: list[rec.PublishedRevision],
    out: Path,
    template: Path | None,
    extras: dict[str, Any],
    layout: str = "revisions",
) -> rec.PublishRecord:
    """Write each revision's tree to ``out/<revision>/`` (the card into main's) and log the plan.

    Layout "repos": each repo's tree goes to ``out/<repo name>/``, with its own card.
    """
    from .card import check_card, write_card

    record = rec.load(run_dir)
    plans = build_plan(record, run_dir, revisions, card=False)
    old = check_dry_run_dir(out, run_dir, record)
    repos = layout == "repos"
    draft = rec.PublishRecord(repo_id, f"dry-run:{out}", False, revisions, layout=layout) if repos else None
    cards = [(r.repo_id, _tree(r)) for r in revisions] if repos else [(None, "main")]
    for repo, _ in cards:  # a broken template writes nothing
        check_card(run_dir, template, extras=extras, repo_id=repo_id, publish=draft, repo=repo)
    names = [_tree(p.revision) for p in plans]
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / DRY_RUN_MARKER).write_text(
            json.dumps({"made_by": f"hubtool {__version__} --dry-run", "revisions": names}) + "\n"
        )
        for name in dict.fromkeys([*old, *names]):  # the trees hubtool wrote here before, and this run's
            dest = out / name
            if dest.is_symlink() or dest.is_file():
                dest.unlink()
            elif dest.is_dir():
                shutil.rmtree(dest)
        for plan, name in zip(plans, names, strict=True):
            dest = out / name
            dest.mkdir(parents=True)
            for path_in_repo, local, _ in plan.files:
                target = dest / path_in_repo
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(local, target)  # a copy, not a link: editing the tree must not touch the run
        for repo, name in cards:
            card = write_card(
                run_dir, template, extras=extras, repo_id=repo_id, out_dir=out / name, save_record=False,
                **({"publish": draft, "repo": repo} if repos else {}),
            )  # fmt: skip
    except OSError as exc:
        raise HubtoolError(
            f"cannot write the dry run into {out}: {exc.strerror or exc}",
            "choose a writable folder with space",
        ) from None
    for line in describe_plan(plans, repo_id):
        log.info("dry run: %s", line)
    extra = sorted(p.relative_to(card.parent).as_posix() for p in card.parent.rglob("*") if p.is_file())
    extra = [e for e in extra if e not in _names(plans[-1 if repos else 0])]
    log.info(
        "dry run: %s the card: %s", "each repo also gets" if repos else "main also gets", ", ".join(extra)
    )
    log.info("dry run: %s trees written to %s (nothing was uploaded)", "repo" if repos else "revision", out)
    if draft is not None:
        return draft
    return rec.PublishRecord(repo_id, f"dry-run:{out}", False, revisions, verified=False)


def _names(plan: RevisionPlan) -> set[str]:
    return {p for p, _, _ in plan.files}


def _tree(r: rec.PublishedRevision) -> str:
    """The folder a dry run writes a revision's tree to: the branch, or the repo's NAME ("repos" layout)."""
    return r.repo_id.split("/")[-1] if r.repo_id else r.revision


# -- one revision ----------------------------------------------------------------------------------
def _sync_revision(api: Any, repo_id: str, plan: RevisionPlan, message: str) -> str:
    """Make the revision hold exactly ``plan.files`` (plus what main keeps); commit only the difference."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.hf_api import RepoFile

    branch = plan.revision.revision
    heads = {b.name: b.target_commit for b in api.list_repo_refs(repo_id).branches}
    if branch not in heads:
        api.create_branch(repo_id, branch=branch, revision=heads.get("main"), exist_ok=True)
        heads = {b.name: b.target_commit for b in api.list_repo_refs(repo_id).branches}
    remote = {
        f.path: f
        for f in api.list_repo_tree(repo_id, revision=heads[branch], recursive=True)
        if isinstance(f, RepoFile)
    }
    ops: list[Any] = []
    wanted = set()
    for path_in_repo, local, frec in plan.files:
        wanted.add(path_in_repo)
        if not _same_file(remote.get(path_in_repo), local, frec):
            ops.append(CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=str(local)))
    stale = sorted(p for p in remote if p not in wanted and p not in KEEP_REMOTE)
    if plan.mirror:
        ops += [CommitOperationDelete(path_in_repo=p) for p in stale]
    elif stale:
        log.info("%s keeps %d file(s) hubtool did not write: %s", branch, len(stale), ", ".join(stale[:5]))
    if not ops:
        log.info("%s@%s is up to date (no commit)", repo_id, branch)
        return heads[branch]
    n_add = sum(isinstance(o, CommitOperationAdd) for o in ops)
    log.info("%s@%s: committing %d changed file(s), %d deletion(s)", repo_id, branch, n_add, len(ops) - n_add)
    info = api.create_commit(
        repo_id, ops, commit_message=message, revision=branch, parent_commit=heads[branch]
    )
    return info.oid


def _same_file(remote: Any, local: Path, frec: rec.FileRecord) -> bool:
    """Whether a remote file already holds the local content (LFS sha256, or git blob id of a small file)."""
    if remote is None or remote.size != frec.size:
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == frec.sha256
    data = local.read_bytes()
    return remote.blob_id == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _ensure_tag(api: Any, repo_id: str, tag: str | None, commit: str) -> None:
    """Tag ``commit``; a tag that exists at the same commit is fine, one elsewhere is never moved."""
    if not tag:
        return
    tags = {t.name: t.target_commit for t in api.list_repo_refs(repo_id).tags}
    if tag in tags:
        if tags[tag] == commit:
            return
        raise HubtoolError(
            f"tag {tag} already points to commit {tags[tag][:12]}, not to the new commit {commit[:12]}",
            "tags are never moved: pass a new --tag",
        )
    api.create_tag(repo_id, tag=tag, revision=commit, tag_message=f"hubtool {__version__}")


def verify(
    api: Any, repo_id: str, plans: list[RevisionPlan], *, endpoint: str, token: str | None = None
) -> None:
    """Check that each branch and tag points to its commit and every remote file's sha256 matches the record."""
    from huggingface_hub.hf_api import RepoFile

    refs = api.list_repo_refs(repo_id)
    branches = {b.name: b.target_commit for b in refs.branches}
    tags = {t.name: t.target_commit for t in refs.tags}
    for plan in plans:
        r = plan.revision
        if branches.get(r.revision) != r.commit:
            raise HubtoolError(
                f"verify: branch {r.revision} is at {branches.get(r.revision)}, expected {r.commit}"
            )
        if r.tag and tags.get(r.tag) != r.commit:
            raise HubtoolError(f"verify: tag {r.tag} is at {tags.get(r.tag)}, expected {r.commit}")
        remote = {
            f.path: f
            for f in api.list_repo_tree(repo_id, revision=r.commit, recursive=True)
            if isinstance(f, RepoFile)
        }
        for path_in_repo, _, frec in plan.files:
            f = remote.get(path_in_repo)
            if f is None:
                raise HubtoolError(f"verify: {path_in_repo} is missing from {repo_id}@{r.revision}")
            if f.lfs is not None:
                sha, size = f.lfs.sha256, f.lfs.size
            else:
                data = _download(repo_id, path_in_repo, r.commit, endpoint, token)
                sha, size = hashlib.sha256(data).hexdigest(), len(data)
            if sha != frec.sha256 or size != frec.size:
                raise HubtoolError(
                    f"verify: {repo_id}@{r.revision}:{path_in_repo} has sha256 {sha[:12]}…, "
                    f"the record says {frec.sha256[:12]}…",
                    "re-run the upload",
                )
    log.info(
        "verified %d revision(s) of %s: refs and sha256 of every file match the record", len(plans), repo_id
    )


def _download(repo_id: str, path: str, revision: str, endpoint: str, token: str | None) -> bytes:
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(repo_id, path, revision=revision, endpoint=endpoint)
    resp = get_session().get(url, headers=build_hf_headers(token=token, library_name="hubtool"))
    hf_raise_for_status(resp)
    return resp.content


# -- the client ------------------------------------------------------------------------------------
def _endpoint(endpoint: str | None) -> str:
    from huggingface_hub import constants

    url = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HubtoolError(
            f"endpoint {url!r} is not an http(s) URL", "e.g. --endpoint https://huggingface.co"
        )
    return url


def _resolve_token(token: str | None) -> str:
    from huggingface_hub import get_token

    secret = token or get_token()
    if not secret:
        raise HubtoolError(
            "no Hugging Face token found", "set HF_TOKEN or run `hf auth login` with a token that can write"
        )
    return secret


def _api(endpoint: str, token: str) -> Any:
    """An HfApi for ``endpoint`` with ``token``."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token, library_name="hubtool", library_version=__version__)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def is_loopback(endpoint: str) -> bool:
    """Whether ``endpoint`` is a server on this machine (127.0.0.0/8, ::1, localhost)."""
    host = urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextmanager
def _client_mode(endpoint: str) -> Iterator[None]:
    """The client's import-time switches as this upload needs them, restored afterwards.

    ``HF_HUB_DISABLE_XET`` is honoured as set now (the client reads it at import). An endpoint on this
    machine (a local Hub such as tests/hubserver.py) gets classic LFS, which is all such a server speaks,
    and is reachable in offline mode; any other endpoint is refused while ``HF_HUB_OFFLINE`` is set.
    """
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET
    try:
        if _env_true("HF_HUB_DISABLE_XET"):
            constants.HF_HUB_DISABLE_XET = True
        if is_loopback(endpoint):
            if constants.HF_HUB_OFFLINE or not constants.HF_HUB_DISABLE_XET:
                log.info("%s is on this machine: classic LFS uploads, offline mode does not apply", endpoint)
            constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET = False, True
        elif constants.HF_HUB_OFFLINE:
            raise HubtoolError(
                f"HF_HUB_OFFLINE is set, so nothing can be uploaded to {endpoint}", "unset HF_HUB_OFFLINE"
            )
        yield
    finally:
        constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET = saved


def _check_namespace(api: Any, repo_id: str, user: dict) -> None:
    """Refuse a namespace the token's user cannot write to (before anything is created or quantized)."""
    namespace = repo_id.split("/")[0]
    mine = {user.get("name")} | {o.get("name") for o in user.get("orgs", []) if isinstance(o, dict)}
    if namespace in mine:
        return
    if api.repo_exists(repo_id):
        raise HubtoolError(
            f"{repo_id} already exists and belongs to {namespace}, which user {user.get('name')} cannot write to",
            "choose a --repo-id in your own namespace or one of your organizations",
        )
    raise HubtoolError(
        f"user {user.get('name')} cannot create repos under {namespace}",
        "choose a --repo-id in your own namespace or one of your organizations",
    )


def _ensure_repo(api: Any, repo_id: str, private: bool) -> None:
    """Create the repo, or reuse one the token can write to."""
    url = api.create_repo(repo_id, private=private or None, exist_ok=True)  # None: the namespace's default
    log.info("repo %s ready (%s)", repo_id, url)
    if private and not getattr(api.repo_info(repo_id), "private", True):
        log.warning("%s already exists and is public; --private does not change an existing repo", repo_id)


@dataclass
class _Step:
    now: str
    repo: str | None = None  # the repo the step writes to, when not the one the upload was given


@contextmanager
def _hub_errors(step: _Step, endpoint: str, repo_id: str, secret: str | None) -> Iterator[None]:
    """Turn the client's errors into one-line HubtoolErrors that never contain the token."""
    try:
        yield
    except HubtoolError as exc:
        raise HubtoolError(_scrub(exc.message, secret), _scrub(exc.hint, secret)) from None
    except Exception as exc:  # noqa: BLE001 - every client failure becomes one clear line
        message, hint = _describe(exc, step.now, endpoint, step.repo or repo_id)
        raise HubtoolError(_scrub(message, secret), _scrub(hint, secret)) from None


def _describe(exc: BaseException, step: str, endpoint: str, repo_id: str) -> tuple[str, str | None]:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    chain = _chain(exc)
    http = next((e for e in chain if isinstance(e, HfHubHTTPError) and e.response is not None), None)
    if http is not None:
        status = http.response.status_code
        detail = _first_line(getattr(http, "server_message", None) or str(http))
        if status == 401:
            return (
                f"the Hub at {endpoint} rejected the token (401 Unauthorized) while {step}",
                "check HF_TOKEN or run `hf auth login` with a valid token",
            )
        if status == 403:
            return (
                f"no write access to {repo_id} (403 Forbidden) while {step}: {detail}",
                "use a token with write access to this namespace, or choose another --repo-id",
            )
        if status == 404:
            return f"not found (404) while {step}: {detail}", "check --repo-id and --endpoint"
        if status >= 500:
            return (
                f"the Hub failed ({status}) while {step}: {detail}",
                "re-run the same command: what is already uploaded is not sent again",
            )
        return f"the Hub answered {status} while {step}: {detail}", None
    frames = [f.name for e in chain for f in traceback.extract_tb(e.__traceback__)]
    if any("xet" in str(e).lower() for e in chain) or any("xet" in name for name in frames):
        return (
            f"the Xet upload to {endpoint} failed while {step}: {_first_line(str(exc))}",
            "an endpoint without Xet storage (a local or self-hosted Hub) needs HF_HUB_DISABLE_XET=1",
        )
    if any(isinstance(e, OfflineModeIsEnabled) for e in chain):
        return "HF_HUB_OFFLINE is set, so nothing can be uploaded", "unset HF_HUB_OFFLINE"
    network = next((e for e in chain if isinstance(e, _transport_errors())), None)
    if network is not None:
        if step == "checking the token":  # the first request: the endpoint itself is likely wrong
            return (
                f"lost the connection to {endpoint} while {step} ({type(network).__name__})",
                "check --endpoint (or HF_ENDPOINT) and the network; nothing was uploaded",
            )
        return (
            f"lost the connection to {endpoint} while {step} ({type(network).__name__})",
            "re-run the same command to finish: files already uploaded are not sent again",
        )
    if isinstance(exc, ValueError) and "metadata" in str(exc).lower():
        return (
            f"the Hub refused the card's metadata: {_first_line(str(exc))}",
            "fix the card template or extras",
        )
    return f"{type(exc).__name__} while {step}: {_first_line(str(exc))}", None


def _chain(exc: BaseException) -> list[BaseException]:
    out, seen = [], set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _transport_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        try:
            errs.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errs)


def _first_line(text: str) -> str:
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line[:300]


def _scrub(text: str | None, secret: str | None) -> str | None:
    if text is None or not secret:
        return text
    return text.replace(secret, "***")
