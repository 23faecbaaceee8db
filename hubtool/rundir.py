"""The run folder's rules: which folder `hubtool quantize` may create, reuse, resume or clear.

A run folder is hubtool's own output. hubtool knows one by its marker file (``.hubtool-run``, written when
hubtool creates or claims the folder), by ``.incomplete`` (present while a run is unfinished), or by a
finished record (a ``run.json`` that hubtool wrote). The rules:

* hubtool clears only a folder that holds a hubtool run, and then only the names its stages write there
  (``OWN_NAMES``); anything else in that folder stays. A non-empty folder holding no hubtool run is
  never used, whatever the flags.
* The run folder never overlaps the source (is it, holds it, or lies inside it), and it is never ``/``,
  the current directory, the home directory or a folder above either; all compared as real paths.
  An empty ``-o`` (an unset shell variable) is refused, never read as the current directory.
* An unfinished run with finished blocks (``.work/<variant>/state.json``) continues with ``--resume``,
  and only when the inputs it started with (``.work/inputs.json``: the source's identity, spec, method,
  recipe, calibration and formats) match this call's. An unfinished run with nothing worth resuming is
  started over by a plain rerun.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from . import record as rec
from .core.fsio import atomic_write_text
from .errors import HubtoolError

log = logging.getLogger(__name__)

MARKER = ".hubtool-run"
INCOMPLETE = ".incomplete"
WORK_DIR = ".work"
INPUTS = "inputs.json"  # inside WORK_DIR
# What hubtool's stages write into a run folder: the record, the markers, the quantizer's work files, the
# exports, and card.CARD_DIR, compare.IMAGES_DIR, evaluate.CACHE_DIR (a test keeps these in step).
OWN_NAMES = (rec.RECORD_NAME, MARKER, INCOMPLETE, WORK_DIR, "formats", "card", "compare", "eval_cache")

# States of a run folder (see ``state``).
NEW = "new"  # absent or empty
FINISHED = "finished"  # holds hubtool's run.json
RESUMABLE = "resumable"  # unfinished, with at least one finished block saved
RETRY = "retry"  # unfinished, nothing worth resuming: a plain rerun starts it over
FOREIGN = "foreign"  # not empty and not a hubtool run: never touched

# Local files are fingerprinted from their size, their safetensors header and SAMPLES chunks spread
# over them (whole below WHOLE_BELOW bytes): reading a 100 GB model this way takes seconds, and two
# random-weight models of one shape still differ in every chunk.
SAMPLES = 16
CHUNK = 1 << 18
WHOLE_BELOW = 16 << 20


# -- the path itself -------------------------------------------------------------------------------
def output_path(value: str | os.PathLike | None, flag: str = "-o/--output") -> Path:
    """RUN_DIR from an -o value, refusing an empty one (`-o "$OUT"` with OUT unset must not mean ".")."""
    if value is None or not str(value).strip():
        raise HubtoolError(
            f"{flag} is empty (an unset shell variable?)",
            "name the run folder, e.g. -o runs/my-model-int4",
        )
    return Path(value)


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _protected(run_dir: Path) -> str | None:
    """Why ``run_dir`` can never be a run folder (the root, cwd, home or above them), else None."""
    real = _real(run_dir)
    cwd = _real(Path.cwd())
    home = _real(Path(os.path.expanduser("~")))
    if real == Path(real.anchor):
        return "the root folder"
    if real == cwd:
        return "the current directory"
    if real == home:
        return "the home directory"
    if real in cwd.parents:
        return "a folder above the current directory"
    if real in home.parents:
        return "a folder above the home directory"
    return None


def check_apart(run_dir: Path, sources: list[Path]) -> None:
    """Refuse a run folder that is, holds, or lies inside one of the ``sources`` (paths or real paths)."""
    runs = {Path(os.path.abspath(run_dir)), _real(run_dir)}
    for source in sources:
        srcs = {Path(os.path.abspath(source)), _real(source)}
        for r in runs:
            for s in srcs:
                if r == s:
                    why = "is the source"
                elif r in s.parents:
                    why = f"holds the source {source}"
                elif s in r.parents:
                    why = f"is inside the source {source}"
                else:
                    continue
                raise HubtoolError(
                    f"-o {run_dir} {why}; hubtool never writes into or clears its source",
                    "choose a run folder outside the source, e.g. -o runs/<name>-int4",
                )


def _check_writable(run_dir: Path) -> None:
    """Refuse a run folder that cannot be created or written (nothing is written to find out)."""
    run_dir = Path(os.path.abspath(run_dir))
    probe = run_dir
    while not probe.exists() and not probe.is_symlink():
        probe = probe.parent
    if not probe.is_dir():
        raise HubtoolError(
            f"cannot create {run_dir}: {probe} is a file, not a folder", "choose another -o RUN_DIR"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise HubtoolError(f"cannot write to {probe} (read-only)", "choose a writable -o RUN_DIR")


# -- what a folder holds ---------------------------------------------------------------------------
def is_record(path: Path) -> bool:
    """Whether ``path`` is a run.json that hubtool wrote (not just any file of that name)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "hubtool_version" in data and isinstance(data.get("source"), dict)


def is_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a hubtool run (its marker, .incomplete, or hubtool's run.json)."""
    run_dir = Path(run_dir)
    return (
        (run_dir / MARKER).is_file()
        or (run_dir / INCOMPLETE).is_file()
        or is_record(run_dir / rec.RECORD_NAME)
    )


def finished_blocks(run_dir: Path) -> int:
    """Blocks finished and saved by an unfinished run, over all its variants (0: nothing to resume)."""
    total = 0
    for state_file in sorted((Path(run_dir) / WORK_DIR).glob("*/state.json")):
        try:
            total += int(json.loads(state_file.read_text()).get("done", 0))
        except (OSError, ValueError, TypeError, AttributeError):
            continue
    return total


def state(run_dir: Path) -> str:
    """One of NEW, FINISHED, RESUMABLE, RETRY, FOREIGN (reads only)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return NEW
    if not is_run(run_dir):
        return FOREIGN
    if is_record(run_dir / rec.RECORD_NAME) and not (run_dir / INCOMPLETE).exists():
        return FINISHED
    return RESUMABLE if finished_blocks(run_dir) else RETRY


def check(run_dir: Path, overwrite: bool, resume: bool, sources: list[Path] = ()) -> str:
    """Refuse a RUN_DIR that cannot be used as asked, before anything is written; return its state."""
    run_dir = Path(run_dir)
    if overwrite and resume:
        raise HubtoolError("--overwrite and --resume exclude each other", "pass one of them")
    if run_dir.exists() and not run_dir.is_dir():
        raise HubtoolError(f"{run_dir} exists and is not a folder", "choose another -o RUN_DIR")
    why = _protected(run_dir)
    if why:
        raise HubtoolError(
            f"-o {run_dir} is {why}; a run folder must be a folder of its own",
            "name a new folder, e.g. -o runs/<name>-int4",
        )
    check_apart(run_dir, list(sources))
    _check_writable(run_dir)
    st = state(run_dir)
    if st == FOREIGN:
        raise HubtoolError(
            f"{run_dir} is not empty and holds no hubtool run (hubtool never clears it, not even with --overwrite)",
            "choose a new or empty -o RUN_DIR",
        )
    if resume and st == NEW:
        raise HubtoolError(
            f"{run_dir} holds no interrupted run to resume", "run the same command without --resume"
        )
    if resume and st == FINISHED:
        raise HubtoolError(
            f"{run_dir} already holds a finished run; there is nothing to resume",
            "run the same command with --overwrite instead of --resume to redo it",
        )
    if not (resume or overwrite) and st == FINISHED:
        raise HubtoolError(
            f"{run_dir} already holds a finished run",
            "pass --overwrite to redo it, or choose another -o RUN_DIR",
        )
    if not (resume or overwrite) and st == RESUMABLE:
        raise HubtoolError(
            f"{run_dir} holds an interrupted run ({finished_blocks(run_dir)} blocks done)",
            "pass --resume to continue it, or --overwrite to start over",
        )
    if resume and st == RETRY:
        log.info("%s holds no finished block: starting the run over", run_dir)
    return st


# -- changing the folder ---------------------------------------------------------------------------
def clear(run_dir: Path) -> None:
    """Remove what hubtool wrote into the run folder ``run_dir`` (the record first); nothing else."""
    run_dir = Path(run_dir)
    if not is_run(run_dir):  # the one guard every deletion passes
        raise HubtoolError(f"{run_dir} holds no hubtool run; hubtool never clears it")
    (run_dir / rec.RECORD_NAME).unlink(missing_ok=True)  # first: a crash from here leaves no record
    for name in OWN_NAMES:
        path = run_dir / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
    for tmp in run_dir.glob(f".{rec.RECORD_NAME}.*.tmp"):  # an atomic write cut short
        tmp.unlink()
    others = sorted(p.name for p in run_dir.iterdir())
    if others:
        log.info("kept %s in %s (not written by hubtool)", ", ".join(others), run_dir)


def claim(run_dir: Path, note: str) -> None:
    """Create ``run_dir`` if needed and mark it as a hubtool run that is unfinished."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MARKER).write_text(
        "This folder is a hubtool run folder: hubtool may replace what it wrote here.\n"
    )
    (run_dir / INCOMPLETE).write_text(note)


def os_error(exc: OSError, run_dir: Path) -> HubtoolError | None:
    """The one-line error for an OSError met while writing the run folder (None: not a user problem)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        done = finished_blocks(run_dir)
        how = (
            "add --resume to continue from the last finished block" if done else "run the same command again"
        )
        return HubtoolError(f"disk full while writing {run_dir}", f"free some space, then {how}")
    if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST):
        return None
    where = Path(os.path.abspath(exc.filename)) if exc.filename else None
    if (
        where is not None
        and where != Path(os.path.abspath(run_dir))
        and Path(os.path.abspath(run_dir)) not in where.parents
    ):
        return HubtoolError(f"cannot use {where}: {exc.strerror}", "check that path and its permissions")
    hint = (
        "choose a writable -o RUN_DIR"
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
        else "choose another -o RUN_DIR"
    )
    return HubtoolError(f"cannot write {where or run_dir}: {exc.strerror}", hint)


# -- what a run started from (resume) --------------------------------------------------------------
def fingerprint_file(path: Path) -> str:
    """sha256 of a file's size, its safetensors header (if any) and SAMPLES chunks spread over it."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(f"{size};".encode())
    with open(path, "rb") as f:
        if size <= WHOLE_BELOW:
            while block := f.read(1 << 20):
                h.update(block)
            return h.hexdigest()
        if path.suffix == ".safetensors":
            n = int.from_bytes(f.read(8), "little")
            if 0 < n <= size - 8:
                h.update(f.read(n))
        for k in range(SAMPLES):  # the first chunk, the last, and evenly between
            f.seek(k * (size - CHUNK) // (SAMPLES - 1))
            h.update(f.read(CHUNK))
    return h.hexdigest()


def fingerprint_folder(folder: Path, patterns: tuple[str, ...]) -> str:
    """sha256 over the names and fingerprints of the files matching ``patterns`` in ``folder``."""
    h = hashlib.sha256()
    files = sorted({p for pat in patterns for p in Path(folder).glob(pat) if p.is_file()})
    for p in files:
        h.update(f"{p.relative_to(folder).as_posix()}:{fingerprint_file(p)};".encode())
    return h.hexdigest()


def source_identity(info: rec.SourceInfo, folder: Path) -> dict[str, Any]:
    """What a source is, not where: a Hub commit, a GGUF's sha256, or a folder's config and weights."""
    if info.kind == "gguf":
        return {"kind": "gguf", "name": info.name, "sha256": info.sha256}
    if info.kind == "hub" and info.commit:
        return {"kind": "hub", "name": info.name, "commit": info.commit}
    config = Path(folder) / "config.json"
    return {
        "kind": info.kind,
        "name": info.name,
        "config": rec.sha256_file(config) if config.is_file() else None,
        "weights": fingerprint_folder(folder, ("*.safetensors",)),
    }


def calibration_identity(calib: list[str]) -> list[dict[str, Any]]:
    """The calibration sets as given, with a fingerprint of each local file or folder."""
    out = []
    for c in calib or ["(default)"]:
        p = Path(c).expanduser()
        item: dict[str, Any] = {"source": c}
        if p.is_file():
            item["fingerprint"] = fingerprint_file(p)
        elif p.is_dir():
            item["fingerprint"] = fingerprint_folder(p, ("**/*",))
        out.append(item)
    return out


def write_inputs(run_dir: Path, inputs: dict[str, Any]) -> None:
    """Record what this run starts from, for a later --resume to compare."""
    atomic_write_text(Path(run_dir) / WORK_DIR / INPUTS, json.dumps(inputs, indent=2) + "\n")


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(_show(v) for v in value) or "none"
    if isinstance(value, dict) and "source" in value:
        return str(value["source"])
    return str(value)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    so, sn = old.get("source") or {}, new.get("source") or {}
    location_free = so.get("kind") == sn.get("kind") and so.get("kind") in ("dir", "gguf")
    same = {k: v for k, v in so.items() if k != "name"} == {k: v for k, v in sn.items() if k != "name"}
    if not (same if location_free else so == sn):
        name = sn.get("name")
        if so.get("name") != name:
            out.append(f"the source differs from the interrupted run's (was {so.get('name')}, now {name})")
        elif so.get("kind") == sn.get("kind") == "dir" and so.get("config") != sn.get("config"):
            out.append(f"the source's config.json differs from the interrupted run's ({name} changed since)")
        else:
            out.append(f"the source's weights differ from the interrupted run's ({name} changed since)")
    for key in ("spec", "recipe"):
        a, b = old.get(key) or {}, new.get(key) or {}
        changed = [f"{k} {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        if changed:
            out.append(f"the {key} differs from the interrupted run's ({', '.join(changed)})")
    for key, noun in (("method", "method"), ("calibration", "calibration"), ("formats", "formats")):
        if old.get(key) != new.get(key):
            a, b = _show(old.get(key)), _show(new.get(key))
            if a == b:
                a, b = a + " (its content changed)", b
            out.append(f"the {noun} differs from the interrupted run's ({a} -> {b})")
    return out


def check_inputs(run_dir: Path, inputs: dict[str, Any]) -> None:
    """Refuse to resume ``run_dir`` unless it started from the same ``inputs`` (one line naming what differs)."""
    path = Path(run_dir) / WORK_DIR / INPUTS
    hint = "pass --overwrite instead of --resume to start over with these inputs"
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HubtoolError(
            f"cannot resume {run_dir}: it does not record what it started from (an older hubtool made it)",
            hint,
        ) from None
    except (OSError, ValueError) as exc:
        raise HubtoolError(f"cannot resume {run_dir}: {path} is unreadable ({exc})", hint) from None
    diffs = _differences(old if isinstance(old, dict) else {}, inputs)
    if diffs:
        raise HubtoolError(
            f"cannot resume {run_dir}: " + "; ".join(diffs),
            "rerun with the interrupted run's options to continue it, or " + hint,
        )
