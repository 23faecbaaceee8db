"""Example prompts for ``hubtool compare``: the prompts.yaml format, its validation, and the defaults.

prompts.yaml is a list of entries (or a mapping with a ``prompts:`` list)::

    - text: "Explain int4 quantization in two sentences."
      max_new_tokens: 64          # optional (default 64)
      system: "You are terse."    # optional
    - text: "What is in this picture?"
      image: pictures/cat.png     # optional: a path (relative to this file) or an http(s) URL

Every entry is checked, and every image opened, before any model loads; an error names the line.
"""

from __future__ import annotations

import io
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..assets import DEFAULT_IMAGE_PROMPT, default_image_path
from ..errors import HubtoolError

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_TEXT_PROMPT = "Explain in two sentences what quantizing a language model to 4-bit weights does."
DEFAULT_IMAGE_NAME = "hubtool:default.png"  # how the shipped image is named in the record
KEYS = {"text", "image", "max_new_tokens", "system"}


@dataclass
class Prompt:
    """One validated example prompt; ``image`` is the decoded picture (RGB), ``image_ref`` how it was named."""

    text: str
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    system: str | None = None
    image_ref: str | None = None
    image: Any = None  # PIL.Image.Image
    line: int = 0


def default_prompts(is_vlm: bool) -> list[Prompt]:
    """One text prompt, plus one image prompt on hubtool's own shipped picture for a VLM."""
    out = [Prompt(text=DEFAULT_TEXT_PROMPT)]
    if is_vlm:
        out.append(
            Prompt(
                text=DEFAULT_IMAGE_PROMPT,
                image_ref=DEFAULT_IMAGE_NAME,
                image=open_image(default_image_path(), "the default image"),
            )
        )
    return out


def load_prompts(path: Path, *, is_vlm: bool = True) -> list[Prompt]:
    """Parse and validate a prompts.yaml (images opened); raise HubtoolError naming the line at fault."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise HubtoolError(f"prompts file {path} not found", "check the --prompts path")
    try:
        text = path.read_text(encoding="utf-8")
        node, data = _parse_yaml(text)
    except UnicodeDecodeError:
        raise HubtoolError(f"{path} is not UTF-8 text", "save the prompts file as UTF-8") from None
    except OSError as exc:
        raise HubtoolError(
            f"cannot read {path} ({exc.strerror})", "check the file and its permissions"
        ) from None
    except DuplicateKeyError as exc:
        raise HubtoolError(
            f"{path} line {exc.mark.line + 1}: duplicate key {exc.key!r} (first on line {exc.first})",
            "keep one of the two; YAML would silently drop the first",
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise HubtoolError(f"{path}{where}: invalid YAML ({problem})", "fix the YAML syntax") from None
    if isinstance(data, dict):
        if "prompts" not in data:
            raise HubtoolError(
                f"{path}: a mapping at the top needs a `prompts:` key",
                "write `prompts:` followed by `- text: ...`",
            )
        items = data["prompts"]
        node = next((v for k, v in node.value if k.value == "prompts"), None)  # None: from a `<<:` merge
    else:
        items = data
    if not isinstance(items, list) or not items:
        line = f" line {node.start_mark.line + 1}" if node is not None else ""
        raise HubtoolError(
            f"{path}{line}: expected a non-empty list of prompts",
            "write entries like `- text: ...` (see the docs)",
        )
    lines = (
        [n.start_mark.line + 1 for n in node.value]
        if node is not None and len(node.value) == len(items)
        else [0] * len(items)
    )
    out = []
    for item, line in zip(items, lines, strict=True):
        out.append(_parse_entry(item, path, line, is_vlm))
    return out


class DuplicateKeyError(Exception):
    """A YAML mapping that repeats a key (``mark``: where the repeat is, ``first``: line of the first one)."""

    def __init__(self, key: Any, first: int, mark: Any):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.first, self.mark = key, first, mark


def _parse_yaml(text: str) -> tuple[Any, Any]:
    """(root node, data) of a YAML document; a mapping that repeats a key raises DuplicateKeyError."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """SafeLoader that refuses duplicate keys (plain PyYAML silently keeps the last one)."""

        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, int] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # `<<: *base` keys may be overridden by design
                    key = self.construct_object(key_node, deep=True)
                    line = key_node.start_mark.line + 1
                    try:
                        if key in seen:
                            raise DuplicateKeyError(key, seen[key], key_node.start_mark)
                        seen[key] = line
                    except TypeError:  # an unhashable key: SafeLoader reports it itself
                        continue
            return super().construct_mapping(node, deep=deep)

    loader = UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return node, data


def _parse_entry(item: Any, path: Path, line: int, is_vlm: bool) -> Prompt:
    where = f"{path} line {line}"
    if isinstance(item, str):
        item = {"text": item}
    if not isinstance(item, dict):
        raise HubtoolError(f"{where}: a prompt must be a mapping with a `text:` key", "write `- text: ...`")
    unknown = sorted(set(map(str, item)) - KEYS)
    if unknown:
        raise HubtoolError(f"{where}: unknown key {unknown[0]!r}", "allowed keys: " + ", ".join(sorted(KEYS)))
    text = item.get("text")
    if not isinstance(text, str) or not text.strip():
        raise HubtoolError(f"{where}: missing `text` (the prompt)", "add `text: ...` to this entry")
    mnt = item.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if isinstance(mnt, bool) or not isinstance(mnt, int) or not 1 <= mnt <= 8192:
        raise HubtoolError(f"{where}: max_new_tokens must be an integer from 1 to 8192, not {mnt!r}")
    system = item.get("system")
    if system is not None and not isinstance(system, str):
        raise HubtoolError(f"{where}: `system` must be text")
    ref = item.get("image")
    image = None
    if ref is not None:
        if not isinstance(ref, str) or not ref.strip():
            raise HubtoolError(f"{where}: `image` must be a path or an http(s) URL")
        if not is_vlm:
            raise HubtoolError(
                f"{where}: this prompt has an image, but the model is text-only",
                "drop `image:` for a text model",
            )
        image = fetch_image(ref, base=path.parent, where=where)
    return Prompt(text=text, max_new_tokens=mnt, system=system, image_ref=ref, image=image, line=line)


def is_offline() -> bool:
    """Whether the environment asks for no network (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def fetch_image(ref: str, base: Path | None = None, where: str = "image", timeout: float = 20.0):
    """Open an image from a path (relative to ``base``) or an http(s) URL (only when online), as RGB."""
    if ref.startswith(("http://", "https://")):
        if is_offline():
            raise HubtoolError(
                f"{where}: image URL {ref} cannot be fetched offline (HF_HUB_OFFLINE is set)",
                "download the image and give its path instead",
            )
        try:
            with urllib.request.urlopen(ref, timeout=timeout) as resp:  # noqa: S310 - http(s) only
                data = resp.read()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise HubtoolError(
                f"{where}: cannot fetch image {ref} ({exc})",
                "check the URL or the network, or use a local path",
            ) from None
        return open_image(io.BytesIO(data), f"{where}: image {ref}")
    p = Path(ref).expanduser()
    if not p.is_absolute() and base is not None:
        p = base / p
    if not p.is_file():
        raise HubtoolError(f"{where}: image {ref} not found", f"looked for {p}")
    return open_image(p, f"{where}: image {ref}")


def open_image(src: Any, what: str):
    """Decode an image file (path, bytes or file object) fully into an RGB PIL image, or raise HubtoolError."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(src, bytes | bytearray):
        src = io.BytesIO(src)
    try:
        with Image.open(src) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise HubtoolError(
            f"{what} is not a readable image ({exc})", "use a PNG, JPEG or WebP file"
        ) from None
