"""Load any int4 GPTQ-packed checkpoint (hubtool, auto_round, GPTQ v1/v2 — ours or another tool's) onto Int4Linear.

The checkpoint's own quantization_config is translated into a ``hubtool`` one (the modules to swap are
the ones whose ``.qweight`` the safetensors hold), and transformers' loader does the rest through
hubtool's HfQuantizer (``runtime.hf_quantizer``): the model is built on the meta device, the listed
linears become ``Int4Linear``, the shards load (safetensors only, never pickle), tied weights are tied,
the model is put in eval mode. Nothing here needs the quantizer (``quant``) or ``integrations``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import HubtoolError
from ..formats.export import INDEX_NAME, WEIGHTS_NAME
from ..formats.table import FORMATS, PACKING_AWQ, PACKING_V1, PACKING_V2
from ..source import _check_remote_code, auto_model_class, local_dir, locate
from ..source import load_processor as _load_processor
from .backends import get_backend

log = logging.getLogger(__name__)

HUBTOOL = FORMATS["hubtool"].quant_method
AUTO_ROUND = FORMATS["auto_round"]
# auto-round's quant_method as the tools of several versions spell it
AUTO_ROUND_METHODS = (AUTO_ROUND.quant_method, "auto_round", "intel/auto-round")
_QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


@dataclass
class CheckpointTensors:
    """What the safetensors headers say: every key's shape and dtype, and the quantized modules."""

    files: list[Path]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)

    def quantized_modules(self) -> list[str]:
        """Checkpoint names of the modules that hold a ``qweight``."""
        return [k.removesuffix(".qweight") for k in self.shapes if k.endswith(".qweight")]


def resolve_folder(
    path_or_id: str | Path, revision: str | None = None, trust_remote_code: bool = False
) -> Path:
    """A local folder holding the checkpoint (a Hub id is downloaded into the cache first)."""
    p = Path(path_or_id).expanduser()
    if p.is_file():
        raise HubtoolError(f"{path_or_id} is a file; hubtool.load takes a model folder or a Hub id")
    info = locate(str(path_or_id), revision=revision, trust_remote_code=trust_remote_code)
    if info.kind == "gguf":
        raise HubtoolError(f"{path_or_id} is a GGUF file", "quantize it with `hubtool quantize` first")
    return local_dir(info)


def read_checkpoint(folder: Path) -> CheckpointTensors:
    """Read and check the safetensors headers (index or single file); broken files raise HubtoolError."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise HubtoolError(
                f"{index} is not a valid safetensors index ({exc})", "re-download it"
            ) from None
        files = [folder / n for n in names]
        for f in files:
            if not f.is_file():
                raise HubtoolError(f"{index} lists {f.name}, which is missing", "re-download the checkpoint")
    elif (folder / WEIGHTS_NAME).is_file():
        files = [folder / WEIGHTS_NAME]
    else:
        others = sorted(p.name for p in folder.glob("*.safetensors"))
        if len(others) == 1:
            files = [folder / others[0]]
        else:
            pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
            if pickled:
                raise HubtoolError(
                    f"{folder} holds only pickle weights ({pickled[0]}); hubtool never loads pickle",
                    "convert the checkpoint to safetensors first",
                )
            raise HubtoolError(
                f"{folder} has no model.safetensors (or index)", "point at a complete model folder"
            )
    ck = CheckpointTensors(files=files)
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    sl = handle.get_slice(key)
                    ck.shapes[key] = tuple(sl.get_shape())
                    ck.dtypes[key] = sl.get_dtype()
        except HubtoolError:
            raise
        except Exception as exc:  # safetensors raises its own error types for broken headers / short files
            raise HubtoolError(
                f"{f} is not a valid safetensors file ({str(exc).splitlines()[0]})",
                "re-download or re-export it",
            ) from None
    return ck


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise HubtoolError(f"{folder} is not a model folder (no config.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HubtoolError(f"{path} is not valid JSON ({exc})", "re-download or re-export it") from None
    if not isinstance(data, dict):
        raise HubtoolError(f"{path} is not a model config")
    return data


def _source_qconfig(config_dict: dict[str, Any]) -> dict[str, Any]:
    qc = config_dict.get("quantization_config")
    if not qc:
        for sub in ("text_config", "language_config", "llm_config"):
            qc = (config_dict.get(sub) or {}).get("quantization_config")
            if qc:
                break
    if not qc or not isinstance(qc, dict):
        raise HubtoolError(
            "this checkpoint is not quantized (config.json has no quantization_config)",
            "load a 16-bit model with transformers, or quantize it with `hubtool quantize`",
        )
    return qc


def _unsupported(what: str) -> HubtoolError:
    return HubtoolError(
        f"unsupported quantized checkpoint: {what}",
        "hubtool loads int4 GPTQ-packed checkpoints (hubtool, auto_round auto_gptq/auto_round packing, GPTQ v1/v2)",
    )


def hubtool_config_for(qc: dict[str, Any], ck: CheckpointTensors) -> dict[str, Any]:
    """Translate a checkpoint's quantization_config (hubtool / auto-round / gptq) into a hubtool one."""
    method = str(qc.get("quant_method", "")).lower()
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    if bits != 4:
        raise _unsupported(f"{bits}-bit weights")
    int8 = list(qc.get("int8_modules") or []) if method == HUBTOOL else []
    for name in int8:  # a quantized lm_head (hubtool only): int8 codes and one float32 scale per row
        if ck.dtypes.get(f"{name}.qweight") != "I8" or f"{name}.scales" not in ck.shapes:
            raise HubtoolError(
                f"the checkpoint lists {name} as int8 but lacks its int8 tensors", "re-export it"
            )
    modules = [m for m in ck.quantized_modules() if m not in int8]
    if not modules:
        raise _unsupported("no tensor ends in .qweight")
    if method == HUBTOOL:
        out = dict(qc)
        packing = out.get("packing_format", PACKING_V1)
    elif method in AUTO_ROUND_METHODS:
        packing_format = str(qc.get("packing_format", AUTO_ROUND.packing_format))
        if str(qc.get("data_type", "int")) != "int":
            raise _unsupported(f"auto-round data_type {qc.get('data_type')!r}")
        if int(qc.get("act_bits", 16) or 16) < 16:
            raise _unsupported("quantized activations")
        if "gptq" in packing_format and "awq" not in packing_format:
            packing = PACKING_V1
        elif packing_format in ("auto_round:auto_awq", "auto_awq", "auto_round:awq"):
            packing = PACKING_AWQ
        elif packing_format in (
            "auto_round",
            "auto_round:torch",
            "auto_round:exllamav2",
            "auto_round:tritonv2",
        ):
            packing = PACKING_V2
        else:
            raise _unsupported(f"auto-round packing_format {packing_format!r}")
        for name, cfg in (qc.get("extra_config") or {}).items():
            b = int((cfg or {}).get("bits", bits))
            if b not in (4, 16):
                raise _unsupported(f"{b}-bit layer {name}")
        out = {}
    elif method == "gptq":
        fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise _unsupported(f"GPTQ checkpoint_format {fmt!r}")
        packing = PACKING_V2 if fmt == "gptq_v2" else PACKING_V1
        for rule, cfg in (qc.get("dynamic") or {}).items():
            if not str(rule).startswith("-:") and int((cfg or {}).get("bits", bits)) != 4:
                raise _unsupported(f"GPTQ dynamic rule {rule!r} with {cfg.get('bits')}-bit weights")
        out = {}
    elif method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm" or not qc.get("zero_point", True):
            raise _unsupported(
                f"AWQ version {version!r}" + ("" if qc.get("zero_point", True) else " without zero points")
            )
        packing = PACKING_AWQ
        out = {}
    else:
        raise _unsupported(f"quant_method {method or '(none)'!r}")

    group_size = int(qc.get("group_size", qc.get("q_group_size", 128)))
    group_sizes: dict[str, int] = {}
    for name in modules:
        for suffix in ("qzeros", "scales"):
            if f"{name}.{suffix}" not in ck.shapes:
                raise HubtoolError(
                    f"the checkpoint has {name}.qweight but no {name}.{suffix}", "re-export it"
                )
        k = ck.shapes[f"{name}.qweight"][0] * (1 if packing == PACKING_AWQ else 8)
        groups = ck.shapes[f"{name}.scales"][0]
        if ck.dtypes[f"{name}.qweight"] != "I32":
            raise _unsupported(f"{name}.qweight is {ck.dtypes[f'{name}.qweight']}, not int32")
        if groups <= 0 or k % groups:
            raise _unsupported(f"{name} has {groups} groups over {k} inputs")
        if k // groups != (k if group_size == -1 else group_size):
            group_sizes[name] = k // groups
    with_g_idx = all(f"{n}.g_idx" in ck.shapes for n in modules)
    if method != HUBTOOL:
        out.update(
            {
                "modules": modules,
                "bits": 4,
                "group_size": group_size,
                "sym": bool(qc.get("sym", not qc.get("zero_point", False))),
                "hubtool_version": None,
                "method": None,
                "source_quantization_config": qc,
            }
        )
    out.update({"quant_method": HUBTOOL, "packing_format": packing, "g_idx": with_g_idx})
    out.pop("group_sizes", None)
    if group_sizes:
        out["group_sizes"] = group_sizes
    return out


def load_quantized(
    path_or_id: str | Path,
    *,
    revision: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.bfloat16,
    backend: str | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """Load an int4 hubtool / auto_round / GPTQ checkpoint onto Int4Linear layers, in eval mode.

    ``dtype`` is the dtype of the 16-bit tensors (None: the checkpoint's own); ``backend`` pins a kernel
    backend for every Int4Linear (default: chosen per call).
    """
    from transformers import AutoConfig

    from .hf_quantizer import register

    register()
    folder = resolve_folder(path_or_id, revision, trust_remote_code)
    config_dict = _read_config(folder)
    _check_remote_code(config_dict, trust_remote_code, str(path_or_id))
    source_qc = _source_qconfig(config_dict)
    ck = read_checkpoint(folder)
    hub_qc = hubtool_config_for(source_qc, ck)
    if backend is not None:
        get_backend(backend)  # unknown names fail here, with the list of known ones
        hub_qc["backend"] = backend
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise HubtoolError(f"cannot read the config of {path_or_id}: {str(exc).splitlines()[0]}") from None
    for sub in (getattr(config, k, None) for k in getattr(config, "sub_configs", {}) or {}):
        if sub is not None and getattr(sub, "quantization_config", None) is not None:
            del sub.quantization_config
    config.quantization_config = hub_qc
    cls = auto_model_class(config)
    kwargs: dict[str, Any] = {
        "config": config,
        "dtype": dtype if dtype is not None else "auto",
        "use_safetensors": True,
        "trust_remote_code": trust_remote_code,
        "device_map": {"": str(device)},
        "output_loading_info": True,
    }
    try:
        model, info = cls.from_pretrained(folder, **kwargs)
    except HubtoolError:
        raise
    except Exception as exc:  # transformers / safetensors / torch errors on broken or mismatched files
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise HubtoolError(
            f"cannot load {path_or_id}: {type(exc).__name__}: {first}", "re-export it"
        ) from None
    _check_loading_info(info, str(path_or_id))
    model.eval()
    log.info("loaded %s (%d int4 linears)", path_or_id, len(hub_qc["modules"]))
    return model


def _check_loading_info(info: dict[str, Any], where: str) -> None:
    """Missing or unexpected int4 tensors, or any shape mismatch, mean the checkpoint does not fit the model."""
    missing = [k for k in info.get("missing_keys", []) if k.rpartition(".")[2] in _QUANT_SUFFIXES]
    unexpected = [k for k in info.get("unexpected_keys", []) if k.rpartition(".")[2] in _QUANT_SUFFIXES]
    mismatched = list(info.get("mismatched_keys", []))
    if missing:
        raise HubtoolError(
            f"{where} lacks int4 tensors the model needs, e.g. {sorted(missing)[0]}", "re-export it"
        )
    if unexpected:
        raise HubtoolError(
            f"{where} holds int4 tensors the model has no place for, e.g. {sorted(unexpected)[0]}",
            "the checkpoint's config.json and weights do not match",
        )
    if mismatched:
        key, got, want = mismatched[0][:3]
        raise HubtoolError(f"{where}: {key} has shape {tuple(got)}, the model expects {tuple(want)}")


def load_processor(
    path_or_id: str | Path, *, revision: str | None = None, trust_remote_code: bool = False
) -> Any:
    """The processor (VLM) or tokenizer (text model) saved with a checkpoint."""
    from transformers import AutoConfig

    folder = resolve_folder(path_or_id, revision, trust_remote_code)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    info = locate(str(folder))
    return _load_processor(folder, info, config, trust_remote_code)
