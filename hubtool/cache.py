"""hubtool's cache folder, and GGUF sources converted into it once.

Reading a GGUF through transformers parses the whole file again for the config, the tokenizer and the
weights, and for Gemma 3 270M (a 262k-token vocabulary stored as millions of small fields) that costs
over a minute per load. The first load of a GGUF therefore writes the dequantized model (safetensors),
its tokenizer and the GGUF's string metadata to ``$HUBTOOL_CACHE/gguf/<sha256[:16]>-<dtype>/``; every
later load of the same bytes (compare, eval, the next run) reads that folder in seconds. The folder is
written beside its final name and renamed into place, so a killed conversion never looks finished.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GGUF_META_FILE = "hubtool_gguf.json"  # sha256, file name and string metadata of the GGUF converted here


def cache_root() -> Path:
    """The hubtool cache folder: $HUBTOOL_CACHE or ~/.cache/hubtool."""
    env = os.environ.get("HUBTOOL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hubtool"


def gguf_dir(sha256: str, dtype: str) -> Path:
    """Where the conversion of the GGUF with this sha256 to ``dtype`` lives."""
    return cache_root() / "gguf" / f"{sha256[:16]}-{dtype}"


def load_converted(sha256: str, dtype: str) -> tuple[Path, dict[str, Any]] | None:
    """(folder, GGUF metadata) of a finished conversion of these bytes, or None."""
    d = gguf_dir(sha256, dtype)
    meta_file = d / GGUF_META_FILE
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        return None
    return (d, meta) if meta.get("sha256") == sha256 else None


def store_converted(
    save: Callable[[Path], None], sha256: str, dtype: str, meta: dict[str, Any]
) -> Path | None:
    """Save a converted GGUF as a safetensors folder (``save(folder)`` writes the model and tokenizer files);
    None if it cannot (then nothing is left behind)."""
    final = gguf_dir(sha256, dtype)
    tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save(tmp)
        (tmp / GGUF_META_FILE).write_text(json.dumps({**meta, "sha256": sha256}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except OSError as exc:  # a full or read-only disk only costs the speed-up
        log.warning(
            "could not cache the converted GGUF in %s (%s); it will be parsed again next time", final, exc
        )
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    log.info("cached the converted GGUF in %s (later loads read it instead)", final)
    return final
