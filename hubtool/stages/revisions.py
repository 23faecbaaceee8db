"""The revision plan: which (variant, format) goes to which Hub revision and tag, from the record alone.

``main`` gets the default format (auto_round first, in the order of ``formats.table.FORMATS``) and the
card; every other format of the first variant gets a branch named after it, and the formats of further
variants (one per calibration set) get ``<variant>-<format>`` branches. The card and the upload both read
this plan, so the revision table in the card is the one the upload makes.
"""

from __future__ import annotations

import re

from .. import record as rec
from ..__about__ import __version__
from ..errors import HubtoolError
from ..formats.table import FORMATS


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
