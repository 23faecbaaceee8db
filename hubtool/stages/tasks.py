"""Eval task specs (``--tasks``) and task files: parsed and checked before any model loads.

Spec syntax (one per ``--tasks`` value; several may be given, separated by spaces):

* ``ppl`` — perplexity on hubtool's held-out text (``pydoc_data.topics`` never used for calibration);
  ``ppl:FILE.txt`` / ``ppl:FILE.jsonl`` (a ``text`` field per line) / ``ppl:DATASET[:CONFIG][@SPLIT]``
  (a Hub dataset with a ``text`` column, online only).
* ``lm_eval:TASK[,TASK...]`` — lm-evaluation-harness tasks: registered names (need the Hub for their
  data) or paths to task YAML files (run offline when their data is local).
* ``mcq:FILE.tsv`` — VLMEvalKit multiple-choice layout (MMBench / ScienceQA): ``index``, ``image``
  (base64; or ``image_path``), ``question``, options ``A``..``D`` (more letters allowed), ``answer``
  (a letter), optional ``hint``, ``category``.
* ``yesno:FILE.tsv`` — POPE layout: ``index``, ``image``, ``question``, ``answer`` (yes/no).
* ``vqa:FILE.tsv`` — TextVQA layout: ``index``, ``image``, ``question``, ``answer`` (one answer, or a
  Python-style list of the human answers).
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import hashlib
import io
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import HubtoolError

log = logging.getLogger(__name__)

KINDS = {
    "ppl": "perplexity",
    "lm_eval": "lm_eval",
    "mcq": "mcq",
    "yesno": "yesno",
    "vqa": "vqa",
}
VLM_KINDS = ("mcq", "yesno", "vqa")
TASK_HINT = "tasks: ppl, ppl:FILE, lm_eval:TASK[,TASK], mcq:FILE.tsv, yesno:FILE.tsv, vqa:FILE.tsv"
HELDOUT_NAME = "ppl_heldout"
MISSING = {"", "nan", "none", "null"}


@dataclass
class TaskSpec:
    """One parsed ``--tasks`` entry."""

    spec: str  # as given
    kind: str  # "perplexity" | "lm_eval" | "mcq" | "yesno" | "vqa"
    name: str  # the task's name in the record and the table
    target: str = ""  # file path, dataset id or lm_eval task list ("" for the built-in held-out text)


@dataclass
class Sample:
    """One row of a VLM task file."""

    id: str
    line: int
    question: str
    answer: Any  # option letter (mcq), "yes"/"no" (yesno), list of answers (vqa)
    image: bytes | None = None
    options: dict[str, str] = field(default_factory=dict)
    hint: str | None = None
    category: str | None = None


@dataclass
class TaskData:
    """A task ready to run: its spec, a fingerprint of its content, and what it runs on."""

    spec: TaskSpec
    fingerprint: str  # sha256 of the data (changes invalidate the per-sample cache)
    samples: list[Sample] = field(default_factory=list)  # VLM tasks
    text: str = ""  # perplexity
    source: str = ""  # where the data came from, for the record
    lm_eval_tasks: list[str] = field(default_factory=list)  # names or YAML paths
    lm_eval_paths: list[str] = field(default_factory=list)  # folders to index for lm_eval


# -- specs -----------------------------------------------------------------------------------------


def split_specs(values: list[str] | str) -> list[str]:
    """Flatten ``--tasks`` values: each may hold several specs separated by whitespace."""
    if isinstance(values, str):
        values = [values]
    return [s for v in values for s in v.split()]


def parse_spec(spec: str) -> TaskSpec:
    """Parse one task spec (see the module docstring) without touching files."""
    head, _, arg = spec.partition(":")
    head = head.strip().lower().replace("-", "_")
    arg = arg.strip()
    if head in ("ppl", "perplexity"):
        if not arg:
            return TaskSpec(spec, "perplexity", HELDOUT_NAME)
        p = Path(arg)
        stem = p.stem if p.suffix else re.split(r"[:@]", arg)[0].rstrip("/").split("/")[-1]
        return TaskSpec(spec, "perplexity", f"ppl_{stem}", arg)
    if head in ("lm_eval", "lmeval"):
        items = [t.strip() for t in arg.split(",") if t.strip()]
        if not items:
            raise HubtoolError(f"task {spec!r} names no lm_eval task", "write lm_eval:TASK[,TASK]")
        names = [Path(t).stem if Path(t).suffix in (".yaml", ".yml") else t for t in items]
        return TaskSpec(spec, "lm_eval", ",".join(names), ",".join(items))
    if head in VLM_KINDS:
        if not arg:
            raise HubtoolError(f"task {spec!r} needs a file", f"write {head}:FILE.tsv")
        return TaskSpec(spec, head, Path(arg).stem, arg)
    raise HubtoolError(f"unknown task {spec!r}", TASK_HINT)


def parse_specs(values: list[str] | str) -> list[TaskSpec]:
    """Parse every ``--tasks`` value; names made unique."""
    specs = [parse_spec(s) for s in split_specs(values)]
    if not specs:
        raise HubtoolError("no tasks given", TASK_HINT)
    seen: dict[str, int] = {}
    for s in specs:
        n = seen.get(s.name, 0)
        seen[s.name] = n + 1
        if n:
            s.name = f"{s.name}_{n + 1}"
    return specs


# -- loading / validation --------------------------------------------------------------------------


def load_task(spec: TaskSpec, *, is_vlm: bool, limit: int | None = None) -> TaskData:
    """Read and validate a task's data (no model needed); raise HubtoolError naming the row at fault."""
    if spec.kind in VLM_KINDS and not is_vlm:
        raise HubtoolError(
            f"task {spec.spec!r} needs images, but this run's model is text-only",
            "use ppl or lm_eval tasks for a text model",
        )
    if spec.kind == "perplexity":
        return _load_text(spec)
    if spec.kind == "lm_eval":
        return _load_lm_eval(spec)
    return _load_tsv(spec, limit)


def heldout() -> tuple[str, str]:
    """The built-in held-out text (never used for calibration) and its description."""
    from ..quant.calib import BUILTIN_SOURCE, heldout_text

    return heldout_text(), f"{BUILTIN_SOURCE} (held-out topics)"


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def _load_text(spec: TaskSpec) -> TaskData:
    if not spec.target:
        text, source = heldout()
        return TaskData(spec, _sha(text), text=text, source=source)
    p = Path(spec.target).expanduser()
    if p.suffix in (".txt", ".md", ".text") or (p.exists() and p.suffix not in (".jsonl", ".json")):
        if not p.is_file():
            raise HubtoolError(f"task {spec.spec!r}: file {p} not found", "check the path")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise HubtoolError(f"task {spec.spec!r}: {p} is not UTF-8 text") from None
    elif p.suffix in (".jsonl", ".json"):
        if not p.is_file():
            raise HubtoolError(f"task {spec.spec!r}: file {p} not found", "check the path")
        text = _jsonl_text(p, spec.spec)
    else:
        text = _hub_text(spec)
    if not text.strip():
        raise HubtoolError(f"task {spec.spec!r}: the text is empty")
    return TaskData(spec, _sha(text), text=text, source=spec.target)


def _jsonl_text(p: Path, spec: str) -> str:
    docs = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise HubtoolError(f"task {spec!r}: {p} line {i} is not JSON ({exc.msg})") from None
        if isinstance(obj, str):
            docs.append(obj)
        elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
            docs.append(obj["text"])
        else:
            raise HubtoolError(
                f"task {spec!r}: {p} line {i} has no string `text` field",
                'write one {"text": "..."} per line',
            )
    return "\n\n".join(docs)


def _hub_text(spec: TaskSpec) -> str:
    m = re.fullmatch(r"([\w.\-/]+)(?::([\w.\-]+))?(?:@([\w.\-\[\]:%]+))?", spec.target)
    if not m:
        raise HubtoolError(
            f"task {spec.spec!r}: not a file and not a dataset id",
            "ppl:FILE.txt|.jsonl or ppl:DATASET[:CONFIG][@SPLIT]",
        )
    name, config, split = m.group(1), m.group(2), m.group(3) or "test"
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # offline, unknown dataset, missing split: all the user's to fix
        raise HubtoolError(
            f"task {spec.spec!r}: cannot load dataset {name!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
            "check the id, or use a local .txt/.jsonl file when offline",
        ) from None
    col = (
        "text"
        if "text" in ds.column_names
        else next((c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"), None)
    )
    if col is None:
        raise HubtoolError(f"task {spec.spec!r}: dataset {name!r} has no text column")
    return "\n\n".join(t for t in ds[col] if t)


class _AnyTagLoader:
    """A YAML loader that accepts lm_eval's custom tags (``!function``) as plain values."""

    @staticmethod
    def load(text: str) -> Any:
        import yaml

        class Loader(yaml.SafeLoader):
            pass

        def _any(loader, suffix, node):
            return loader.construct_scalar(node) if isinstance(node, yaml.ScalarNode) else None

        Loader.add_multi_constructor("!", _any)
        return yaml.load(text, Loader=Loader)  # noqa: S506 - SafeLoader subclass


def _load_lm_eval(spec: TaskSpec) -> TaskData:
    tasks, paths, digest = [], [], hashlib.sha256()
    for item in spec.target.split(","):
        p = Path(item).expanduser()
        if p.suffix in (".yaml", ".yml") or p.exists():
            if not p.is_file():
                raise HubtoolError(f"task {spec.spec!r}: lm_eval task file {p} not found", "check the path")
            text = p.read_text(encoding="utf-8")
            try:
                cfg = _AnyTagLoader.load(text)
            except Exception as exc:  # yaml.YAMLError and friends
                raise HubtoolError(
                    f"task {spec.spec!r}: {p} is not valid YAML ({exc})".splitlines()[0]
                ) from None
            if not isinstance(cfg, dict) or not (cfg.get("task") or cfg.get("group")):
                raise HubtoolError(
                    f"task {spec.spec!r}: {p} has no `task:` (or `group:`) key", "see lm_eval's task guide"
                )
            tasks.append(str(p.resolve()))
            paths.append(str(p.resolve().parent))
            digest.update(text.encode())
            for f in _data_files(cfg, p.parent):
                digest.update(f.read_bytes())
        else:
            tasks.append(item)
            digest.update(item.encode())
    return TaskData(
        spec, digest.hexdigest(), source=spec.target, lm_eval_tasks=tasks, lm_eval_paths=sorted(set(paths))
    )


def _data_files(cfg: dict, base: Path) -> list[Path]:
    """Local data files a task YAML names (to fingerprint them)."""
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, str):
        files = [files]
    elif isinstance(files, dict):
        files = [x for v in files.values() for x in ([v] if isinstance(v, str) else v)]
    out = []
    for f in files or []:
        p = Path(f) if Path(f).is_absolute() else base / f
        if p.is_file():
            out.append(p)
    return out


# -- VLMEvalKit TSV layouts ------------------------------------------------------------------------

REQUIRED = {
    "mcq": ("index", "question", "answer"),
    "yesno": ("index", "question", "answer"),
    "vqa": ("index", "question", "answer"),
}


def _missing(v: Any) -> bool:
    return v is None or str(v).strip().lower() in MISSING


def _load_tsv(spec: TaskSpec, limit: int | None) -> TaskData:
    p = Path(spec.target).expanduser()
    if not p.is_file():
        raise HubtoolError(f"task {spec.spec!r}: file {p} not found", "check the path")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise HubtoolError(f"task {spec.spec!r}: {p} is not UTF-8 text") from None
    csv.field_size_limit(sys.maxsize)
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter="\t")
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    where = f"{p} (line 1, the header)"
    need = list(REQUIRED[spec.kind])
    missing = [c for c in need if c not in header]
    if "image" not in header and "image_path" not in header:
        missing.append("image")
    if spec.kind == "mcq" and not {"A", "B"} <= set(header):
        missing += [c for c in ("A", "B") if c not in header]
    if missing:
        raise HubtoolError(
            f"{where}: missing column {missing[0]!r} for a {spec.kind} task",
            "columns found: " + ", ".join(header) if header else "the file is empty",
        )
    letters = [h for h in header if len(h) == 1 and "A" <= h <= "Z"]
    rows: list[tuple[int, dict]] = []
    prev = 1
    for row in reader:
        line = prev + 1
        prev = reader.line_num
        if None in row:
            raise HubtoolError(f"{p} line {line}: more fields than the header has columns")
        if all(_missing(v) for v in row.values()):
            continue
        rows.append((line, row))
    if not rows:
        raise HubtoolError(f"task {spec.spec!r}: {p} has no rows")
    by_index = {}
    for line, row in rows:
        idx = str(row.get("index") or "").strip()
        if _missing(idx):
            raise HubtoolError(f"{p} line {line}: empty `index`")
        if idx in by_index:
            raise HubtoolError(f"{p} line {line}: duplicate index {idx!r} (first on line {by_index[idx][0]})")
        by_index[idx] = (line, row)
    used = rows if limit is None else rows[:limit]
    samples = [_sample(spec.kind, p, line, row, letters, by_index) for line, row in used]
    return TaskData(spec, _sha(raw), samples=samples, source=str(p))


def _sample(kind: str, p: Path, line: int, row: dict, letters: list[str], by_index: dict) -> Sample:
    where = f"{p} line {line}"
    for col in REQUIRED[kind]:
        if _missing(row.get(col)):
            raise HubtoolError(f"{where}: missing value in column {col!r}")
    image = _row_image(p, where, row, by_index)
    question = str(row["question"]).strip()
    answer_raw = str(row["answer"]).strip()
    s = Sample(
        id=str(row["index"]).strip(),
        line=line,
        question=question,
        answer=answer_raw,
        image=image,
        hint=None if _missing(row.get("hint")) else str(row["hint"]).strip(),
        category=None if _missing(row.get("category")) else str(row["category"]).strip(),
    )
    if kind == "mcq":
        s.options = {k: str(row[k]).strip() for k in letters if not _missing(row.get(k))}
        if len(s.options) < 2:
            raise HubtoolError(f"{where}: fewer than two options (columns {', '.join(letters)})")
        if answer_raw.upper() not in s.options:
            raise HubtoolError(
                f"{where}: answer {answer_raw!r} is not one of the options {', '.join(s.options)}",
                "the answer column holds the letter of the right option",
            )
        s.answer = answer_raw.upper()
    elif kind == "yesno":
        if answer_raw.lower() not in ("yes", "no"):
            raise HubtoolError(f"{where}: answer must be yes or no, not {answer_raw!r}")
        s.answer = answer_raw.lower()
    else:
        s.answer = _vqa_answers(answer_raw, where)
    return s


def _vqa_answers(raw: str, where: str) -> list[str]:
    if raw.startswith("["):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raise HubtoolError(
                f"{where}: answer looks like a list but does not parse: {raw[:60]!r}"
            ) from None
        if (
            not isinstance(value, list | tuple)
            or not value
            or not all(isinstance(a, str | int | float) for a in value)
        ):
            raise HubtoolError(f"{where}: answer list must hold one or more strings")
        return [str(a) for a in value]
    return [raw]


def _row_image(p: Path, where: str, row: dict, by_index: dict, depth: int = 0) -> bytes:
    value = row.get("image")
    if _missing(value) and not _missing(row.get("image_path")):
        ip = Path(str(row["image_path"]).strip())
        ip = ip if ip.is_absolute() else p.parent / ip
        if not ip.is_file():
            raise HubtoolError(f"{where}: image_path {ip} not found")
        data = ip.read_bytes()
    elif _missing(value):
        raise HubtoolError(f"{where}: missing value in column 'image'")
    else:
        value = str(value).strip()
        if len(value) <= 64 and value in by_index and depth == 0:  # MMBench: a row's image reused by index
            ref_line, ref_row = by_index[value]
            return _row_image(p, f"{p} line {ref_line}", ref_row, by_index, depth=1)
        try:
            data = base64.b64decode(value, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise HubtoolError(f"{where}: column 'image' is not base64 ({exc})") from None
    check_image(data, f"{where}: column 'image'")
    return data


def check_image(data: bytes, what: str) -> None:
    """Cheap check that bytes are an image PIL can read (header and, for PNG, checksums; no full decode)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise HubtoolError(
            f"{what} is not a readable image ({exc})", "use a PNG, JPEG or WebP image"
        ) from None


def to_json_line(obj: dict) -> str:
    """One compact JSON line (for the per-sample caches)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"
