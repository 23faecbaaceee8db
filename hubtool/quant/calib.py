"""Calibration data: text or image-text samples, tokenized once, with a record of where they came from.

Sources (``--calib``): nothing (the Hub's ``NeelNanda/pile-10k`` when the Hub is reachable, otherwise an
embedded corpus built from the standard library's ``pydoc_data.topics``), ``builtin``, a local
``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` file or a folder of them, a Hub dataset id, and for
vision-language models an image-text jsonl/json (``{"image": path, "text": ...}`` or llava-style
``{"image": path, "conversations": [{"from": "human", "value": "<image>\\n..."}, ...]}``).

Text is packed: documents are tokenized, concatenated and cut into windows of ``seqlen`` tokens (a BOS
token first when the tokenizer has one), so text samples carry no padding. Image-text samples are one
conversation each, rendered with the processor's chat template and right-padded to a common length;
``attention_mask`` marks the padding, which the tuning loss ignores.

A fixed part of the builtin corpus never enters calibration: :func:`heldout_text` returns it, so that
evaluation can measure perplexity on text the quantizer has not seen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import HubtoolError
from ..record import CalibrationInfo

log = logging.getLogger(__name__)

BUILTIN_SOURCE = "builtin:pydoc_data.topics"
BUILTIN_NAME = "pydoc-topics"
BUILTIN_ALIASES = ("builtin", "pydoc", "pydoc-topics", BUILTIN_SOURCE)
HUB_DEFAULT = "NeelNanda/pile-10k"
TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
TEXT_KEYS = ("text", "content", "conversations", "messages")
IMAGE_KEYS = ("image", "images", "image_path")
# Topics of pydoc_data.topics that calibration never uses (about 14% of the corpus): held-out text.
HELDOUT_TOPICS = (
    "debugger",
    "formatstrings",
    "typesmapping",
    "exceptions",
    "execmodel",
    "numbers",
    "in",
)


@dataclass
class CalibrationSet:
    """Tokenized calibration samples (each a dict of tensors with batch dim 1, all the same length)."""

    info: CalibrationInfo
    samples: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def seq_len(self) -> int:
        """Token length of every sample."""
        return int(self.samples[0]["input_ids"].shape[-1]) if self.samples else 0

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The samples at ``indices`` collated into one batch (tensors concatenated along dim 0)."""
        keys = self.samples[indices[0]].keys()
        return {k: torch.cat([self.samples[i][k] for i in indices], dim=0) for k in keys}

    def batches(self, batch_size: int | None = None) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """Consecutive batches as (sample indices, collated tensors)."""
        bs = batch_size or self.info.batch_size or 1
        for start in range(0, len(self.samples), bs):
            idx = list(range(start, min(start + bs, len(self.samples))))
            yield idx, self.batch(idx)


# -- the builtin corpus ----------------------------------------------------------------------------
def _topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return topics


def builtin_documents() -> list[str]:
    """The builtin calibration documents: pydoc topics in sorted order, without the held-out ones."""
    topics = _topics()
    held = set(HELDOUT_TOPICS)
    return [topics[k] for k in sorted(topics) if k not in held]


def heldout_text() -> str:
    """English prose from ``pydoc_data.topics`` that calibration never uses (for held-out perplexity)."""
    topics = _topics()
    return "\n\n".join(topics[k] for k in HELDOUT_TOPICS if k in topics)


# -- entry point -----------------------------------------------------------------------------------
def load_calibration(
    source: str | None,
    processor: Any,
    *,
    nsamples: int,
    seqlen: int,
    seed: int = 42,
    is_vlm: bool = False,
    image_text: bool = False,
    batch_size: int = 8,
) -> CalibrationSet:
    """Load and tokenize one calibration set; bad input raises HubtoolError before any model work.

    ``image_text=True`` demands image-text data (``--quantize-vision``).
    """
    if nsamples < 1 or seqlen < 2:
        raise HubtoolError(f"calibration needs nsamples >= 1 and seqlen >= 2, got {nsamples} x {seqlen}")
    docs, images, meta = _read_source(source)
    kind = "image-text" if images else "text"
    if kind == "image-text" and not is_vlm:
        raise HubtoolError(
            f"calibration set {meta['name']!r} holds images but the model is text-only",
            "use a text calibration set (txt, jsonl with a 'text' column) for a language model",
        )
    if image_text and kind != "image-text":
        raise HubtoolError(
            f"--quantize-vision needs image-text calibration data, but {meta['name']!r} is text only",
            "pass --calib FILE.jsonl with records like {'image': 'a.jpg', 'text': '...'}",
        )
    if kind == "image-text":
        samples = _image_text_samples(docs, images, processor, nsamples, seqlen, seed)
    else:
        samples = _text_samples(docs, processor, nsamples, seqlen, seed, meta["name"])
    info = CalibrationInfo(
        name=meta["name"],
        source=meta["source"],
        kind=kind,
        sha256=meta["sha256"],
        nsamples=len(samples),
        seqlen=int(samples[0]["input_ids"].shape[-1]),
        batch_size=batch_size,
        builtin=meta["source"] == BUILTIN_SOURCE,
    )
    log.info(
        "calibration %s (%s): %d samples x %d tokens, sha256 %s",
        info.name,
        info.kind,
        info.nsamples,
        info.seqlen,
        (info.sha256 or "")[:12],
    )
    return CalibrationSet(info=info, samples=samples)


# -- reading sources -------------------------------------------------------------------------------
def _read_source(source: str | None) -> tuple[list[Any], list[Path | None], dict[str, str]]:
    """Documents (str, or chat records for image-text), their images (or empty) and name/source/sha256."""
    if source is None:
        docs = _try_hub_default()
        if docs is not None:
            return docs, [], _meta(HUB_DEFAULT, HUB_DEFAULT, _sha_texts(docs))
        source = BUILTIN_SOURCE
    if source in BUILTIN_ALIASES:
        docs = builtin_documents()
        return docs, [], _meta(BUILTIN_NAME, BUILTIN_SOURCE, _sha_texts(docs))
    path = Path(source).expanduser()
    if path.exists():
        return _read_local(path)
    if source.count("/") == 1 and not source.startswith((".", "/", "~")) and not Path(source).suffix:
        docs = _read_hub(source)
        return docs, [], _meta(source, source, _sha_texts(docs))
    raise HubtoolError(
        f"calibration source {source!r} not found",
        "give a local .txt/.jsonl/.json/.parquet file or folder, a Hub dataset id (org/name), or 'builtin'",
    )


def check_source(source: str | None) -> None:
    """Cheap up-front check of a --calib value (exists, readable, known kind); nothing is tokenized."""
    if source is None or source in BUILTIN_ALIASES:
        return
    path = Path(source).expanduser()
    if path.exists():
        files = [path]
        if path.is_dir():
            try:
                files = sorted(
                    p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                )
            except OSError as exc:
                raise HubtoolError(
                    f"calibration folder {path} cannot be read ({exc.strerror})", "check its permissions"
                ) from None
            if not files:
                raise HubtoolError(
                    f"calibration folder {path} holds no .txt/.jsonl/.json/.parquet file",
                    "point at the data files",
                )
        elif path.suffix.lower() not in TEXT_SUFFIXES:
            raise HubtoolError(
                f"calibration file {path.name} has an unsupported type", "use .txt, .jsonl, .json or .parquet"
            )
        for f in files:
            try:
                with open(f, "rb") as handle:
                    handle.read(1)
            except OSError as exc:
                raise HubtoolError(
                    f"calibration file {f} cannot be read ({exc.strerror})",
                    "check the file and its permissions",
                ) from None
        return
    if source.count("/") == 1 and not source.startswith((".", "/", "~")) and not Path(source).suffix:
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(source)
        except HFValidationError:
            raise HubtoolError(
                f"calibration source {source!r} is neither a local path nor a valid Hub dataset id",
                "a Hub id is org/name with letters, digits, '-', '_' and '.' only",
            ) from None
        if _offline():
            raise HubtoolError(
                f"calibration dataset {source!r} is on the Hub but HF_HUB_OFFLINE is set",
                "unset HF_HUB_OFFLINE, or pass a local file or 'builtin'",
            )
        import importlib.util

        if importlib.util.find_spec("datasets") is None:
            raise HubtoolError(
                f"loading the Hub dataset {source!r} needs the `datasets` package", "pip install datasets"
            )
        return
    raise HubtoolError(
        f"calibration source {source!r} not found",
        "give a local .txt/.jsonl/.json/.parquet file or folder, a Hub dataset id (org/name), or 'builtin'",
    )


def _meta(name: str, source: str, sha: str) -> dict[str, str]:
    return {"name": name, "source": source, "sha256": sha}


def _sha_texts(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def _offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(f, "").strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _hub_reachable(timeout: float = 3.0) -> bool:
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        with urllib.request.urlopen(f"{endpoint}/api/datasets/{HUB_DEFAULT}", timeout=timeout) as r:
            return r.status == 200
    except Exception:  # any network failure means "not reachable"
        return False


def _try_hub_default() -> list[str] | None:
    """The Hub default corpus when `datasets` is installed and the Hub answers quickly, else None."""
    if _offline():
        return None
    try:
        import datasets  # noqa: F401
    except ImportError:
        return None
    if not _hub_reachable():
        log.info("the Hub is not reachable: using the builtin calibration corpus")
        return None
    try:
        return _read_hub(HUB_DEFAULT)
    except HubtoolError as exc:
        log.warning("could not load %s (%s): using the builtin calibration corpus", HUB_DEFAULT, exc.message)
        return None


def _read_hub(dataset_id: str) -> list[str]:
    if _offline():
        raise HubtoolError(
            f"calibration dataset {dataset_id!r} is on the Hub but HF_HUB_OFFLINE is set",
            "unset HF_HUB_OFFLINE, or pass a local file or 'builtin'",
        )
    try:
        import datasets
    except ImportError:
        raise HubtoolError(
            f"loading the Hub dataset {dataset_id!r} needs the `datasets` package", "pip install datasets"
        ) from None
    try:
        ds = datasets.load_dataset(dataset_id, split="train")
    except Exception as exc:  # datasets raises many types (network, missing repo, bad config)
        raise HubtoolError(
            f"cannot load the Hub dataset {dataset_id!r}: {type(exc).__name__}: {exc}".splitlines()[0],
            "check the id and the network, or pass a local file",
        ) from None
    column = next((c for c in ("text", "content") if c in ds.column_names), None)
    if column is None:
        raise HubtoolError(
            f"Hub dataset {dataset_id!r} has no 'text' column (columns: {', '.join(ds.column_names)})",
            "image-text Hub sets are not read directly: export them to a local jsonl with image paths",
        )
    return [t for t in ds[column] if isinstance(t, str) and t.strip()]


def _read_local(path: Path) -> tuple[list[Any], list[Path | None], dict[str, str]]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise HubtoolError(
                f"calibration folder {path} holds no .txt/.jsonl/.json/.parquet file",
                "point at the data files",
            )
    else:
        if path.suffix.lower() not in TEXT_SUFFIXES:
            raise HubtoolError(
                f"calibration file {path.name} has an unsupported type", "use .txt, .jsonl, .json or .parquet"
            )
        files = [path]
    h = hashlib.sha256()
    docs: list[Any] = []
    images: list[Path | None] = []
    for f in files:
        raw = f.read_bytes()
        h.update(raw)
        new_docs, new_images = _parse_file(f, raw)
        docs += new_docs
        images += new_images
    if not docs:
        raise HubtoolError(f"calibration source {path} holds no text", "check the file contents")
    has_images = any(i is not None for i in images)
    if has_images:
        keep = [(d, i) for d, i in zip(docs, images, strict=True) if i is not None]
        if len(keep) < len(docs):
            log.warning("calibration: %d records without an image skipped", len(docs) - len(keep))
        docs, images = [d for d, _ in keep], [i for _, i in keep]
        for img in images:
            h.update(_check_image(img))
    else:
        images = []
        docs = [d if isinstance(d, str) else _record_text(d) for d in docs]
    name = path.stem if path.is_file() else path.name
    return docs, images, _meta(name, str(path.resolve()), h.hexdigest())


def _parse_file(f: Path, raw: bytes) -> tuple[list[Any], list[Path | None]]:
    """(documents, image paths or None) of one file; a document is a str or a chat record (list of turns)."""
    suffix = f.suffix.lower()
    if suffix == ".txt":
        text = raw.decode("utf-8", errors="replace")
        return ([text] if text.strip() else []), ([None] if text.strip() else [])
    if suffix == ".parquet":
        records = _parquet_records(f)
    elif suffix == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise HubtoolError(f"{f} is not valid JSON: {exc}", "fix the file") from None
        records = data if isinstance(data, list) else [data]
    else:
        records = []
        for n, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise HubtoolError(f"{f}:{n} is not valid JSON: {exc}", "one JSON object per line") from None
    docs: list[Any] = []
    images: list[Path | None] = []
    for n, rec in enumerate(records, 1):
        if not isinstance(rec, dict):
            raise HubtoolError(f"{f}: record {n} is not an object", "each record must be a JSON object")
        key = next((k for k in TEXT_KEYS if k in rec), None)
        if key is None:
            raise HubtoolError(
                f"{f}: record {n} has no text column (keys: {', '.join(map(str, rec)) or 'none'})",
                "give each record a 'text' field, or llava-style 'conversations'",
            )
        turns = _turns(rec[key], f, n)
        image = next((rec[k] for k in IMAGE_KEYS if rec.get(k)), None)
        if isinstance(image, list):
            image = image[0] if image else None
        docs.append(turns)
        images.append(_resolve_image(f, str(image)) if image else None)
    return docs, images


def _parquet_records(f: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise HubtoolError(
            "reading .parquet calibration files needs pyarrow", "pip install pyarrow"
        ) from None
    try:
        table = pq.read_table(str(f))
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends
        raise HubtoolError(f"{f} is not a readable parquet file: {exc}", "re-export it") from None
    if not any(k in table.column_names for k in TEXT_KEYS):
        raise HubtoolError(
            f"{f} has no text column (columns: {', '.join(table.column_names)})",
            "name the text column 'text'",
        )
    return table.to_pylist()


def _turns(value: Any, f: Path, n: int) -> list[dict[str, str]]:
    """Normalize a text field into chat turns [{'role': ..., 'content': str}]."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(t, dict) for t in value):
        roles = {
            "human": "user",
            "user": "user",
            "gpt": "assistant",
            "assistant": "assistant",
            "system": "system",
        }
        out = []
        for t in value:
            text = t.get("value", t.get("content"))
            role = roles.get(str(t.get("from", t.get("role", "user"))).lower(), "user")
            if isinstance(text, list):  # already structured content: keep the text parts
                text = "".join(c.get("text", "") for c in text if isinstance(c, dict))
            if not isinstance(text, str):
                raise HubtoolError(
                    f"{f}: record {n} has a turn without text", "each turn needs 'value' or 'content'"
                )
            out.append({"role": role, "content": text})
        if out:
            return out
    raise HubtoolError(f"{f}: record {n} has an unreadable text field", "use a string or a list of turns")


def _record_text(turns: list[dict[str, str]]) -> str:
    return "\n".join(t["content"].replace("<image>", "").strip() for t in turns)


def _resolve_image(f: Path, name: str) -> Path:
    p = Path(name).expanduser()
    for cand in [p] if p.is_absolute() else [f.parent / p, f.parent / "images" / p]:
        if cand.is_file():
            return cand
    raise HubtoolError(f"{f}: image {name!r} not found", f"image paths are relative to {f.parent}")


def _check_image(path: Path) -> bytes:
    from PIL import Image

    raw = path.read_bytes()
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:  # PIL raises many error types for broken files
        raise HubtoolError(
            f"image {path} is unreadable ({type(exc).__name__})", "replace or remove it"
        ) from None
    return raw


# -- tokenizing ------------------------------------------------------------------------------------
def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def _text_samples(
    docs: list[str], processor: Any, nsamples: int, seqlen: int, seed: int, name: str
) -> list[dict[str, torch.Tensor]]:
    tok = _tokenizer(processor)
    bos = getattr(tok, "bos_token_id", None)
    body = seqlen - (1 if bos is not None else 0)
    ids = tok([d for d in docs if d.strip()], add_special_tokens=False)["input_ids"]
    sep = [tok.eos_token_id] if getattr(tok, "eos_token_id", None) is not None else []
    stream: list[int] = []
    for d in ids:
        stream += d + sep
    if len(stream) < body:
        raise HubtoolError(
            f"calibration set {name!r} has only {len(stream)} tokens, fewer than one sample of {seqlen}",
            "lower --seqlen or give more text",
        )
    rng = random.Random(seed)
    chunks = len(stream) // body
    if chunks >= nsamples:
        starts = [c * body for c in rng.sample(range(chunks), nsamples)]
    else:
        log.warning(
            "calibration set %r has %d tokens, fewer than %d x %d: samples overlap",
            name,
            len(stream),
            nsamples,
            seqlen,
        )
        starts = [c * body for c in range(chunks)]
        starts += [rng.randrange(0, len(stream) - body + 1) for _ in range(nsamples - chunks)]
    out = []
    for s in starts:
        row = ([bos] if bos is not None else []) + stream[s : s + body]
        t = torch.tensor([row], dtype=torch.long)
        out.append({"input_ids": t, "attention_mask": torch.ones_like(t)})
    return out


def _messages(turns: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Chat messages with structured content, the image placed where '<image>' was (or first)."""
    placed = False
    out = []
    for t in turns:
        parts = t["content"].split("<image>")
        content: list[dict[str, str]] = []
        for i, part in enumerate(parts):
            if i > 0 and not placed:
                content.append({"type": "image"})
                placed = True
            if part.strip():
                content.append({"type": "text", "text": part.strip()})
        out.append({"role": t["role"], "content": content})
    if not placed:
        first = next((m for m in out if m["role"] == "user"), out[0])
        first["content"].insert(0, {"type": "image"})
    return out


def _image_text_samples(
    records: list[list[dict[str, str]]],
    images: list[Path],
    processor: Any,
    nsamples: int,
    seqlen: int,
    seed: int,
) -> list[dict[str, torch.Tensor]]:
    from PIL import Image

    if not hasattr(processor, "image_processor"):
        raise HubtoolError(
            "image-text calibration needs the model's processor (with an image processor)",
            "load the model as a vision-language model",
        )
    order = list(range(len(records)))
    if len(order) > nsamples:
        order = sorted(random.Random(seed).sample(order, nsamples))
    elif len(order) < nsamples:
        log.warning("image-text calibration has %d records, fewer than --nsamples %d", len(order), nsamples)
    tok = _tokenizer(processor)
    image_token = getattr(processor, "image_token_id", None)
    raw = []
    for i in order:
        text = processor.apply_chat_template(
            _messages(records[i]), tokenize=False, add_generation_prompt=False
        )
        try:
            with Image.open(images[i]) as im:
                img = im.convert("RGB")
        except Exception as exc:  # PIL raises many error types for broken files
            raise HubtoolError(f"image {images[i]} is unreadable ({type(exc).__name__})") from None
        enc = processor(text=[text], images=[img], return_tensors="pt")
        sample = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
        n = sample["input_ids"].shape[-1]
        if n > seqlen:
            last_image = 0
            if image_token is not None:
                hits = (sample["input_ids"][0] == image_token).nonzero()
                last_image = int(hits[-1]) + 1 if len(hits) else 0
            cut = max(seqlen, last_image)
            for k in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"):
                if k in sample and sample[k].shape[-1] == n:
                    sample[k] = sample[k][:, :cut]
        raw.append(sample)
    length = max(s["input_ids"].shape[-1] for s in raw)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    for s in raw:
        n = s["input_ids"].shape[-1]
        if n < length:
            s["input_ids"] = torch.nn.functional.pad(s["input_ids"], (0, length - n), value=pad)
            if "attention_mask" in s:
                s["attention_mask"] = torch.nn.functional.pad(s["attention_mask"], (0, length - n), value=0)
            for k in ("token_type_ids", "mm_token_type_ids"):
                if k in s and s[k].shape[-1] == n:
                    s[k] = torch.nn.functional.pad(s[k], (0, length - n), value=0)
        s.setdefault("attention_mask", torch.ones_like(s["input_ids"]))
    return raw
