"""The run record (``run.json``): every fact a run produced, the single source of the model card.

Each stage reads the record, adds its part and writes it back atomically. Dataclasses map to JSON
one to one (``to_json`` / ``from_json``); ``schema_version`` changes when a field changes meaning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .core.fsio import atomic_write_text
from .errors import HubtoolError

SCHEMA_VERSION = 1
RECORD_NAME = "run.json"


@dataclass
class SourceInfo:
    """Where the 16-bit model came from."""

    kind: str  # "hub" | "dir" | "gguf"
    name: str  # Hub id, folder path or gguf path as given
    revision: str | None = None  # as requested
    commit: str | None = None  # resolved Hub commit
    gguf_file: str | None = None
    sha256: str | None = None  # of the gguf file
    architecture: str = ""
    model_type: str = ""
    is_vlm: bool = False
    license: str | None = None
    dtype: str = "bfloat16"
    num_parameters: int = 0
    note: str | None = None  # e.g. "dequantized from GGUF Q4_K_M; this is the 16-bit baseline"


@dataclass
class SkippedLayer:
    """A linear left in 16-bit, and why."""

    name: str
    reason: str


@dataclass
class BlockLoss:
    """Reconstruction loss of one block before (RTN) and after tuning, on the first calibration batch."""

    block: str
    rtn: float
    tuned: float


@dataclass
class CalibrationInfo:
    """The calibration set one int4 variant was tuned on."""

    name: str
    source: str  # path, Hub dataset id, or "builtin:pydoc_data.topics"
    kind: str = "text"  # "text" | "image-text"
    sha256: str | None = None
    nsamples: int = 0
    seqlen: int = 0
    batch_size: int = 0
    builtin: bool = False


@dataclass
class FileRecord:
    """One output file: path relative to the run folder, sha256, size in bytes."""

    path: str
    sha256: str
    size: int


@dataclass
class FormatRecord:
    """One exported model repo."""

    name: str  # auto_round | auto_gptq | hubtool | gguf_q4_0 | gguf_q4_k_m
    path: str  # relative to the run folder
    quant_method: str
    files: list[FileRecord] = field(default_factory=list)
    tensor_types: dict[str, str] = field(default_factory=dict)  # GGUF: each tensor's type in the file


@dataclass
class VariantRecord:
    """One int4 model made in this run (one per calibration set)."""

    name: str
    method: str
    recipe: dict[str, Any] | None = None
    calibration: CalibrationInfo | None = None
    quantized: list[str] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    block_losses: list[BlockLoss] = field(default_factory=list)
    formats: list[FormatRecord] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int = 0
    kernel_backend: str | None = None


@dataclass
class Generation:
    """One model's greedy answer to one prompt."""

    model: str  # "bf16" (the 16-bit source) or a variant name
    text: str
    tokens: int
    seconds: float
    tokens_per_s: float
    token_ids: list[int] = field(default_factory=list)


@dataclass
class Agreement:
    """How an int4 answer matches the 16-bit answer to the same prompt."""

    model: str
    identical: bool
    first_diff: int | None
    match_share: float


@dataclass
class PromptComparison:
    """One example prompt and every model's answer."""

    prompt: str
    image: str | None = None  # the picture, saved in the run folder (path relative to it)
    system: str | None = None
    max_new_tokens: int = 64
    generations: list[Generation] = field(default_factory=list)
    agreements: list[Agreement] = field(default_factory=list)
    # where the picture came from (path or URL as written; "hubtool:default.png")
    image_source: str | None = None


@dataclass
class TaskResult:
    """One metric of one task on one model."""

    task: str
    kind: str  # "perplexity" | "lm_eval" | "mcq" | "yesno" | "vqa"
    metric: str
    model: str
    value: float
    stderr: float | None = None
    n: int = 0
    higher_is_better: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class PublishedRevision:
    """One published revision: which format, which branch/tag, which commit (layout "repos": which repo)."""

    format: str
    variant: str
    revision: str  # branch name ("main" for the default format, and for every repo of the "repos" layout)
    tag: str | None = None
    commit: str | None = None
    repo_id: str | None = None  # layout "repos": the format's own repo (None: the PublishRecord's repo_id)


@dataclass
class PublishRecord:
    """Where the run was published."""

    repo_id: str  # layout "repos": the set's name (--repo-id), each format's repo is named from it
    endpoint: str
    private: bool = False
    revisions: list[PublishedRevision] = field(default_factory=list)
    verified: bool = False
    at: str | None = None
    layout: str = "revisions"  # "revisions": one repo, a revision per format; "repos": a repo per format
    collection: str | None = None  # layout "repos": the slug of the collection that holds the repos


@dataclass
class VerifyResult:
    """One format loaded by one library its users load it with, and checked against hubtool's int4 reference.

    ``failed_check`` names the first check that failed: "reference" (no int4 reference could be built),
    "library" (the loading library is not installed), "load", "modules" (a layer the record quantized is
    not int4 in the loaded model, or one it did not is), "logits" (top-1 or relative error out of bounds),
    "generate". ``files`` fingerprints the format's recorded files: a result counts only for those files.
    """

    variant: str
    format: str
    library: str  # what loaded it: "auto-round", "gptqmodel", "transformers" (after import hubtool), "hubtool.load"
    version: str  # that library's version
    device: str
    passed: bool
    failed_check: str | None = None
    detail: str | None = None  # one line: why it failed, or a note (e.g. a fallback)
    reference: str | None = None  # the format the int4 reference's codes were read from
    dtype: str | None = None  # the dtype the loaded model computed in (the reference used the same)
    positions: int = 0  # next-token positions compared
    top1_agreement: float | None = None  # share of positions whose top-1 token equals the reference's
    decisive_top1: float | None = None  # the same over positions whose reference top-1 leads clearly
    max_rel_error: float | None = None  # max |logit - reference| / max |reference logit|
    rel_error_bound: float | None = None
    int4_modules: int = 0  # int4 layers the loaded model holds
    expected_modules: int = 0  # int4 layers the record lists
    missing_modules: list[str] = field(default_factory=list)  # listed but left 16-bit (first few)
    extra_modules: list[str] = field(default_factory=list)  # int4 but not listed (first few)
    generated_tokens: int = 0
    seconds: float = 0.0
    files: str = ""  # fingerprint of the format's recorded files (format_fingerprint)
    at: str | None = None


def format_fingerprint(fmt: FormatRecord) -> str:
    """A digest of a format's recorded files (paths and sha256): a verify result holds for these files only."""
    h = hashlib.sha256()
    for f in sorted(fmt.files, key=lambda f: f.path):
        h.update(f"{f.path}:{f.sha256}\n".encode())
    return h.hexdigest()


@dataclass
class RunRecord:
    """Everything one run made and measured."""

    source: SourceInfo
    spec: dict[str, Any]
    schema_version: int = SCHEMA_VERSION
    hubtool_version: str = ""
    created_at: str = ""
    command: list[str] = field(default_factory=list)
    libraries: dict[str, str] = field(default_factory=dict)
    hardware: dict[str, Any] = field(default_factory=dict)
    variants: list[VariantRecord] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    peak_rss_bytes: int = 0
    comparisons: list[PromptComparison] = field(default_factory=list)
    evals: list[TaskResult] = field(default_factory=list)
    card: FileRecord | None = None
    card_assets: list[FileRecord] = field(default_factory=list)  # files the card shows (chart, images)
    publish: PublishRecord | None = None
    verify: list[VerifyResult] = field(default_factory=list)  # `hubtool verify`: one per format and library
    extras: dict[str, Any] = field(default_factory=dict)

    def variant(self, name: str) -> VariantRecord:
        """The variant called ``name``."""
        for v in self.variants:
            if v.name == name:
                return v
        raise HubtoolError(
            f"run has no variant {name!r}", "variants: " + ", ".join(v.name for v in self.variants)
        )


def verify_results(record: RunRecord, variant: str, fmt: str) -> list[VerifyResult]:
    """The verify results that hold for one format of one variant as its files are recorded now."""
    v = next((x for x in record.variants if x.name == variant), None)
    f = next((x for x in v.formats if x.name == fmt), None) if v else None
    if f is None:
        return []
    current = format_fingerprint(f)
    return [r for r in record.verify if r.variant == variant and r.format == fmt and r.files == current]


def verify_problem(record: RunRecord, variant: str, fmt: str) -> str | None:
    """Why a format may not be uploaded unverified (None: every library that loads it passed)."""
    results = verify_results(record, variant, fmt)
    if not results:
        stale = any(r.variant == variant and r.format == fmt for r in record.verify)
        return "its files changed since it was verified" if stale else "it was never verified"
    failed = next((r for r in results if not r.passed), None)
    if failed is not None:
        why = f" ({failed.detail})" if failed.detail else ""
        return f"check {failed.failed_check!r} failed with {failed.library}{why}"
    return None


def verified_with(record: RunRecord, variant: str, fmt: str) -> str:
    """The card's words: "verified with auto-round 0.16.1 on cpu", or "not verified"."""
    results = verify_results(record, variant, fmt)
    if not results or not all(r.passed for r in results):
        return "not verified"
    parts = [
        f"{r.library} {r.version} on {r.device}" + (f" ({r.detail})" if r.detail else "") for r in results
    ]
    return "verified with " + "; ".join(parts)


DTYPE_LABELS = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "float32": "fp32"}


def source_label(record: RunRecord) -> str:
    """The 16-bit source's column name: "bf16", or the name of the dtype it was loaded in."""
    return DTYPE_LABELS.get(record.source.dtype, record.source.dtype or "bf16")


# -- JSON mapping ----------------------------------------------------------------------------------
class RecordError(HubtoolError):
    """A record (or part of one) whose JSON does not have the structure its dataclass needs."""


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _kind(value: Any) -> str:
    """How JSON calls a Python value: 'a list', 'a string', 'null'..."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}
    return names.get(type(value)) or ("a number" if isinstance(value, int | float) else type(value).__name__)


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain JSON-able data."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def from_dict(cls: Any, data: Any, where: str = "") -> Any:
    """Build ``cls`` (a dataclass or a typing form) from plain data; unknown keys are ignored.

    Every field is checked against its type: a mismatch raises RecordError naming the field (``where``).
    """
    here = where or "the record"
    if cls is Any:
        return data
    origin = typing.get_origin(cls)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(cls)
        if data is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        return from_dict(rest[0], data, where) if len(rest) == 1 else data
    if origin is list:
        if not isinstance(data, list):
            raise RecordError(f"{here} should be a list, not {_kind(data)}")
        (item,) = typing.get_args(cls)
        return [from_dict(item, x, f"{where}[{i}]") for i, x in enumerate(data)]
    if origin is dict:
        if not isinstance(data, dict):
            raise RecordError(f"{here} should be an object, not {_kind(data)}")
        _, value = typing.get_args(cls)
        return {k: from_dict(value, v, f"{where}.{k}" if where else k) for k, v in data.items()}
    if dataclasses.is_dataclass(cls):
        if not isinstance(data, dict):
            raise RecordError(f"{here} should be an object, not {_kind(data)}")
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        for f in fields:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and f.name not in data:
                raise RecordError(f"{here} has no {f.name!r}" if where else f"no {f.name!r} field")
        names = {f.name for f in fields}
        return cls(
            **{
                k: from_dict(hints[k], v, f"{where}.{k}" if where else k)
                for k, v in data.items()
                if k in names
            }
        )
    if cls in _TYPE_NAMES:
        ok = isinstance(data, cls) and not (cls is int and isinstance(data, bool))
        if cls is float:
            ok = isinstance(data, int | float) and not isinstance(data, bool)
        if not ok:
            raise RecordError(f"{here} should be {_TYPE_NAMES[cls]}, not {_kind(data)}")
    return data


def non_finite(data: Any, where: str = "") -> str | None:
    """The path of the first NaN or infinity in plain data (``None`` when every number is finite)."""
    if isinstance(data, float) and not math.isfinite(data):
        return f"{where or 'the value'} = {data}"
    items = (
        data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list | tuple) else ()
    )
    for k, v in items:
        bad = non_finite(v, f"{where}[{k}]" if isinstance(k, int) else (f"{where}.{k}" if where else str(k)))
        if bad:
            return bad
    return None


def to_json(record: RunRecord) -> str:
    """Serialize a record as strict JSON; a NaN or infinity anywhere is refused (JSON has no such number)."""
    data = to_dict(record)
    bad = non_finite(data)
    if bad:
        raise HubtoolError(
            f"the run record would hold a number that is not finite ({bad}); run.json was not written",
            "check the inputs that produced it (e.g. --lr) and run the stage again",
        )
    return json.dumps(data, indent=2, sort_keys=False, ensure_ascii=False, allow_nan=False) + "\n"


def _refuse_constant(name: str) -> Any:
    raise RecordError(f"it holds {name}, which strict JSON does not allow")


def from_json(text: str) -> RunRecord:
    """Parse a record, refusing one of the wrong structure or written by a newer schema (RecordError)."""
    data = json.loads(text, parse_constant=_refuse_constant)
    if not isinstance(data, dict):
        raise RecordError(f"it holds {_kind(data)}, not an object")
    version = data.get("schema_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise RecordError(f"schema_version should be an integer, not {_kind(version)}")
    if version > SCHEMA_VERSION:
        raise HubtoolError(
            f"run.json has schema {version}, newer than this hubtool understands ({SCHEMA_VERSION})",
            "upgrade hubtool",
        )
    return from_dict(RunRecord, data)


def save(record: RunRecord, run_dir: Path) -> Path:
    """Write ``run_dir/run.json`` atomically."""
    path = Path(run_dir) / RECORD_NAME
    atomic_write_text(path, to_json(record))
    return path


def load(run_dir: Path) -> RunRecord:
    """Read ``run_dir/run.json`` (a finished quantize run), with a clear error if it is missing or broken."""
    path = Path(run_dir) / RECORD_NAME
    if not path.is_file():
        raise HubtoolError(
            f"{run_dir} holds no finished run (no {RECORD_NAME})",
            "run `hubtool quantize SOURCE -o RUN_DIR` first",
        )
    hint = "restore it or run the stage that wrote it again; `hubtool quantize --overwrite` redoes the run"
    try:
        return from_json(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise HubtoolError(f"{path} is not a valid run record: it is not UTF-8 text", hint) from None
    except json.JSONDecodeError as exc:
        raise HubtoolError(
            f"{path} is not a valid run record: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg})",
            hint,
        ) from None
    except RecordError as exc:
        raise HubtoolError(f"{path} is not a valid run record: {exc.message}", hint) from None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_records(root: Path, base: Path) -> list[FileRecord]:
    """FileRecords for every file under ``root``, paths relative to ``base``, sorted."""
    out = []
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            out.append(FileRecord(p.relative_to(base).as_posix(), sha256_file(p), p.stat().st_size))
    return out
