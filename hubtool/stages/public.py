"""What leaves the machine names no local path: the public face of a run record.

``run.json`` keeps the local paths the stages need (the source folder or GGUF file, a Hub source's cache
folder, the calibration file, the eval task files, the prompt images as written, the command as typed,
the card template). Everything that is published (the card, its metadata, the exports' config.json) is
made from ``public_record`` instead, which names:

* the source by its ``base_model`` (``--base-model``, else hubtool.toml's ``[card] base_model``) when one
  is given, else a Hub source by its id, a local folder by its name and a GGUF file by its file name;
* a local calibration set, task file, prompt image, output folder or template by its file name alone;

and drops what only this machine needs (a Hub source's cache folder). A Hub id, a URL and hubtool's own
names (``builtin:...``, ``hubtool:...``) are public and stay as they are.
"""

from __future__ import annotations

import copy
import re
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from .. import record as rec
from ..errors import HubtoolError

PUBLIC_PREFIXES = ("builtin:", "hubtool:", "http://", "https://")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# argv flags of `hubtool quantize` whose value is a local path (the source is the argument after "quantize")
PATH_FLAGS = ("-o", "--output", "--calib")
VERBATIM_FLAGS = ("--skip",)  # a regex, whatever it starts with


def check_base_model(value: Any, what: str = "--base-model") -> str:
    """``value`` if it is a Hub repo id (huggingface_hub's rules), else a one-line HubtoolError naming ``what``."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        if not isinstance(value, str) or not value:
            raise HFValidationError("empty")
        validate_repo_id(value)
    except HFValidationError:
        raise HubtoolError(
            f"{what} {value!r} is not a Hub repo id",
            "name the model this one quantizes by its id on the Hub, e.g. HuggingFaceTB/SmolLM2-135M-Instruct",
        ) from None
    return value


def base_model(record: rec.RunRecord, extras: dict[str, Any] | None = None) -> str | None:
    """The Hub id the card links as ``base_model``: the extras' one, else a Hub source's id, else None."""
    extras = {**record.extras.get("card", {}), **(extras or {})}
    if extras.get("base_model"):
        return check_base_model(extras["base_model"], "base_model")
    return record.source.name if record.source.kind == "hub" else None


def is_hub_id(value: str | None) -> bool:
    """Whether ``value`` reads as a Hub id (ORG/NAME), not as a path on this machine."""
    return bool(value) and bool(_HUB_ID.match(value)) and "--" not in value and ".." not in value


def public_path(value: str | None) -> str | None:
    """A path as it may be published: its last part (a file or folder name); Hub ids, URLs and hubtool's own
    names as they are."""
    if not value or value.startswith(PUBLIC_PREFIXES) or "://" in value or is_hub_id(value):
        return value
    name = PureWindowsPath(value).name if "\\" in value else PurePosixPath(value).name
    return name or value.strip("/\\") or value


def source_name(record: rec.RunRecord, extras: dict[str, Any] | None = None) -> str:
    """How a published file names the source: its base_model, else its Hub id, folder name or GGUF file name."""
    s = record.source
    if s.kind == "hub":
        return s.name
    if s.kind == "gguf":
        return s.gguf_file or public_path(s.name) or s.name
    return base_model(record, extras) or public_path(s.name) or s.name


def public_calibration(calib: dict[str, Any] | None) -> dict[str, Any] | None:
    """A calibration record (``CalibrationInfo`` as a dict) with a local source named by its file name."""
    if not calib:
        return calib
    return {**calib, "source": public_path(calib.get("source"))}


def public_command(record: rec.RunRecord, extras: dict[str, Any] | None = None) -> list[str]:
    """The reproducing command as it may be published: SOURCE as ``source_name``, path values by their names."""
    argv = list(record.command)
    if argv[:2] != ["hubtool", "quantize"]:
        return [_public_arg(a) for a in argv]
    out = argv[:2]
    if len(argv) > 2:  # a Hub id or pypi:<model> reproduces as given; a local source by its public name
        keep = record.source.kind == "hub" or argv[2].startswith("pypi:")
        out.append(argv[2] if keep else source_name(record, extras))
    previous = ""
    for arg in argv[3:]:
        flag, eq, value = arg.partition("=")
        if previous in PATH_FLAGS:
            out.append(public_path(arg) or arg)
        elif eq and flag in PATH_FLAGS:
            out.append(f"{flag}={public_path(value)}")
        elif previous in VERBATIM_FLAGS or (eq and flag in VERBATIM_FLAGS):
            out.append(arg)
        else:
            out.append(_public_arg(arg))
        previous = arg
    return out


def _public_arg(arg: str) -> str:
    """An argv word that is a path on this machine (absolute, or from ``~`` or ``..``) by its name."""
    if arg.startswith(("/", "~", "..", "\\")) or re.match(r"^[A-Za-z]:[\\/]", arg):
        return public_path(arg) or arg
    return arg


def local_paths(record: rec.RunRecord) -> list[str]:
    """The local paths a record names (source, calibration, task files, images, the command's paths, the
    card template and includes), longest first."""
    s = record.source
    found: list[str] = []
    found.append((s.note or "") if s.kind == "hub" else s.name)
    for v in record.variants:
        if v.calibration:
            found.append(v.calibration.source)
    for r in record.evals:
        found += str(r.extra.get("source") or "").split(",")
    found += [c.image_source or "" for c in record.comparisons]
    for given, public in zip(record.command, public_command(record), strict=True):  # the words it renames
        if given != public:
            found.append(given.partition("=")[2] if given.startswith("-") else given)
    card = record.extras.get("card", {})
    found += [str(record.extras.get("card_template") or "")] + [str(p) for p in card.get("includes") or []]
    local = {p for p in found if p and public_path(p) != p and len(p) > 1}
    return sorted(local, key=len, reverse=True)


def scrub(data: Any, paths: list[str]) -> Any:
    """Plain data with every occurrence of ``paths`` (longest first) replaced by its name."""
    if isinstance(data, str):
        for p in paths:
            if p in data:
                data = data.replace(p, public_path(p) or "")
        return data
    if isinstance(data, dict):
        return {k: scrub(v, paths) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [scrub(v, paths) for v in data]
    return data


def public_record(record: rec.RunRecord, extras: dict[str, Any] | None = None) -> rec.RunRecord:
    """A copy of ``record`` that names no local path (see the module docstring); ``record`` is unchanged."""
    paths = local_paths(record)
    out = copy.deepcopy(record)
    command = public_command(record, extras)
    if out.source.kind == "hub":
        out.source.note = None  # the snapshot folder in this machine's cache
    else:  # the folder or file name: the card names the base_model itself, when there is one
        out.source.name = public_path(out.source.name) or out.source.name
    for v in out.variants:
        if v.calibration:
            v.calibration.source = public_path(v.calibration.source) or v.calibration.source
    for r in out.evals:
        if isinstance(r.extra.get("source"), str):
            r.extra["source"] = ",".join(public_path(p) or p for p in r.extra["source"].split(","))
    for c in out.comparisons:
        c.image_source = public_path(c.image_source)
    out.command = command
    if out.extras.get("card_template"):
        out.extras["card_template"] = public_path(str(out.extras["card_template"]))
    card = out.extras.get("card")
    if isinstance(card, dict) and card.get("includes"):
        card["includes"] = [public_path(str(p)) for p in card["includes"]]
    if out.publish and out.publish.endpoint.startswith("dry-run:"):
        out.publish.endpoint = "dry-run"
    return rec.from_dict(rec.RunRecord, scrub(rec.to_dict(out), paths))
