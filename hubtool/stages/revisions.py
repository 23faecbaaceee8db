"""The revision plan: which (variant, format) goes to which Hub revision and tag, from the record alone.

``main`` gets the default format (auto_round first, in the order of ``formats.table.FORMATS``) and the
card; every other format of the first variant gets a branch named after it, and the formats of further
variants (one per calibration set) get ``<variant>-<format>`` branches. The card and the upload both read
this plan, so the revision table in the card is the one the upload makes.

The other layout, ``repos`` (the Hub's release checklist: one repo per variant, grouped in a collection),
gives every (variant, format) pair its own repo, on its ``main``: ``ORG/NAME-<suffix>`` for the formats of
the first variant and ``ORG/NAME-<variant>-<suffix>`` for those of further variants (the variant's name
without hubtool's ``int4-`` prefix: ``ORG/NAME-calib2-GPTQ``), where the suffix is fixed per format (``REPO_SUFFIXES``: the format's name last, as the Hub's ``-GPTQ`` / ``-GGUF`` repos
have it). The default format's repo comes first.
"""

from __future__ import annotations

import re

from .. import record as rec
from ..__about__ import __version__
from ..errors import HubtoolError
from ..formats.table import FORMATS

LAYOUTS = ("revisions", "repos")  # the first is the default
# layout "repos": the repo name's suffix per format. Fixed, not derived from the card's label, so that a
# relabelled format keeps its repos; a format missing here is named by its own name.
REPO_SUFFIXES = {"auto_round": "AutoRound", "auto_gptq": "GPTQ", "hubtool": "hubtool", "gguf": "GGUF"}
MAX_REPO_NAME = 96  # the Hub's limit on the NAME of ORG/NAME
VARIANT_PREFIX = (
    "int4-"  # what quantize's variant names start with (variant_names): not repeated in repo names
)


def default_tag() -> str:
    """The Hub tag used when none is given: the hubtool version ("v0.1.0")."""
    return f"v{__version__}"


def choose_default_format(record: rec.RunRecord, wanted: str | None = None) -> str | None:
    """The format that goes to ``main``: ``wanted`` if the default variant has it, else auto_round first."""
    if not record.variants:
        return None
    names = [f.name for f in record.variants[0].formats]
    if wanted:
        if wanted not in names:
            raise HubtoolError(
                f"--default-format {wanted} was not exported", "exported: " + ", ".join(names or ["none"])
            )
        return wanted
    return next((f for f in FORMATS if f in names), names[0] if names else None)


def plan_revisions(
    record: rec.RunRecord, *, default_format: str | None = None, tag: str | None = None
) -> list[rec.PublishedRevision]:
    """Which (variant, format) goes to which revision and tag; ``main`` first (commits not known yet)."""
    default_format = choose_default_format(record, default_format)
    out: list[rec.PublishedRevision] = []
    for i, v in enumerate(record.variants):
        for f in v.formats:
            if i == 0 and f.name == default_format:
                out.insert(0, rec.PublishedRevision(f.name, v.name, "main", tag))
                continue
            branch = f.name if i == 0 else branch_name(f"{v.name}-{f.name}")
            out.append(rec.PublishedRevision(f.name, v.name, branch, f"{tag}-{branch}" if tag else None))
    return out


def branch_name(name: str) -> str:
    """A Hub branch name made of ``name`` (characters git refuses become "-")."""
    return re.sub(r"[^\w.\-]+", "-", name).strip("-.") or "int4"


def check_layout(layout: str | None) -> str:
    """``layout`` if it is one hubtool knows (None: the default, "revisions"), else a one-line HubtoolError."""
    if layout is None:
        return LAYOUTS[0]
    if layout not in LAYOUTS:
        raise HubtoolError(
            f"--layout {layout!r} is not a layout hubtool knows", "choose one of: " + ", ".join(LAYOUTS)
        )
    return layout


def repo_name(repo_id: str, variant: str | None, fmt: str) -> str:
    """Layout "repos": the repo of one format, ``ORG/NAME-<suffix>`` or ``ORG/NAME-<variant>-<suffix>``.

    ``variant`` is given for the formats of a variant other than the first (its ``int4-`` prefix dropped).
    """
    suffix = REPO_SUFFIXES.get(fmt.split("_", 1)[0] if fmt.startswith("gguf") else fmt) or branch_name(fmt)
    part = branch_name(variant.removeprefix(VARIANT_PREFIX)) if variant else None
    name = f"{repo_id}-{part}-{suffix}" if part else f"{repo_id}-{suffix}"
    if len(name.split("/", 1)[-1]) > MAX_REPO_NAME:
        raise HubtoolError(
            f"the repo name {name} (format {fmt}) is longer than the Hub's {MAX_REPO_NAME} characters",
            "choose a shorter --repo-id",
        )
    return name


def plan_repos(
    record: rec.RunRecord, repo_id: str, *, default_format: str | None = None, tag: str | None = None
) -> list[rec.PublishedRevision]:
    """Layout "repos": which (variant, format) goes to which repo; the default format's repo first.

    Each goes to its repo's ``main``, tagged ``tag``; commits are not known yet.
    """
    default_format = choose_default_format(record, default_format)
    out: list[rec.PublishedRevision] = []
    for i, v in enumerate(record.variants):
        for f in v.formats:
            repo = repo_name(repo_id, v.name if i else None, f.name)
            r = rec.PublishedRevision(f.name, v.name, "main", tag, repo_id=repo)
            if i == 0 and f.name == default_format:
                out.insert(0, r)
            else:
                out.append(r)
    names = [r.repo_id for r in out]
    clash = next((n for n in names if names.count(n) > 1), None)
    if clash:
        raise HubtoolError(f"two formats would go to the same repo {clash}", "rename one of the variants")
    return out


def plan_layout(
    record: rec.RunRecord,
    repo_id: str,
    layout: str | None = None,
    *,
    default_format: str | None = None,
    tag: str | None = None,
) -> list[rec.PublishedRevision]:
    """The plan of ``layout``: ``plan_revisions`` (one repo) or ``plan_repos`` (a repo per format)."""
    if check_layout(layout) == "repos":
        return plan_repos(record, repo_id, default_format=default_format, tag=tag)
    return plan_revisions(record, default_format=default_format, tag=tag)
