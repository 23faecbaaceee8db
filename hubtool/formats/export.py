"""Write a quantized model as a complete model repo in one of the formats the ecosystem loads.

Every format holds the same GPTQ v1 tensors (``core.packing``) for the quantized linears and the model's
own 16-bit tensors (in the model's dtype) for everything else; they differ in config.json (the facts of
each format are in ``formats.table``):

* ``auto_round``: ``quant_method: auto-round``, ``packing_format: auto_round:auto_gptq`` (auto-round
  0.16's own layout for int4, loaded by transformers' AutoRound quantizer);
* ``auto_gptq``: ``quant_method: gptq``, ``checkpoint_format: gptq``, ``desc_act: false``, plus g_idx;
* ``hubtool``: ``quant_method: hubtool`` with the exact list of quantized modules, the spec, the method and
  the recipe; it loads through ``hubtool.runtime.hf_quantizer`` after ``import hubtool``.

A format folder is assembled in a hidden sibling folder and renamed into place, so a crash never leaves
a complete-looking folder behind. It is written shard by shard and tensor by tensor
(``core.shards.write_safetensors_streamed``): each int4 tensor is packed from the codes (which may be
read from a work directory, block by block) when its turn comes, each 16-bit tensor is taken from the
model, or read from the source checkpoint when the model is a streamed skeleton (``core.lazy``); at
most one tensor is in memory at a time.
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..__about__ import __version__
from ..core import packing
from ..core.fsio import fsync_dir, fsync_file, replace_dir
from ..core.intweight import IntWeight
from ..core.lazy import lazy_weights
from ..core.lmhead import HeadWeights
from ..core.memory import trim
from ..core.shards import write_safetensors_streamed
from ..core.spec import QuantSpec
from ..errors import HubtoolError
from .gguf import is_gguf, write_gguf
from .table import ALL_FORMATS, FORMATS

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = "5GB"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SAFETENSORS_METADATA = {"format": "pt"}
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
COPY_CHUNK_BYTES = 64 << 20  # a 16-bit tensor read from a streamed source is copied in blocks of this size


def export_format(
    model: nn.Module,
    processor: Any,
    weights: Mapping[str, IntWeight],
    spec: QuantSpec,
    fmt: str,
    out_dir: Path,
    meta: dict[str, Any],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    source_gguf: Path | None = None,
    head: HeadWeights | None = None,
) -> None:
    """Write ``model`` with ``weights`` (full linear name -> IntWeight) as format ``fmt`` into ``out_dir``.

    A GGUF format (``formats.gguf``) is one ``.gguf`` file; ``source_gguf`` (the source model's own GGUF,
    when it is one) gives its tokenizer fields. ``head`` (the ``hubtool`` format only) is the lm_head
    quantized (``core.lmhead``): its tensors replace the 16-bit head, and a tied head is untied.

    ``meta`` may hold: ``method``, ``recipe`` (dict: iters, nsamples, seqlen, batch_size, lr...),
    ``calibration`` (name or CalibrationInfo dict), ``hubtool_version``, ``block_lists``, ``quantized``
    and ``skipped``. The model is read, never modified. An existing ``out_dir`` is replaced only once
    the new folder is complete; a failure leaves the old one (or none) and no temporary folder.
    """
    if fmt not in FORMATS and not is_gguf(fmt):
        raise HubtoolError(f"unknown format {fmt!r}", "use one of " + ", ".join(ALL_FORMATS))
    if head is not None and fmt != "hubtool":
        raise ValueError(f"the {fmt} format stores a 16-bit lm_head only")
    _check_names(model, weights)
    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    state_dict = None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(out_dir)
        tmp.mkdir()
        if is_gguf(fmt):
            write_gguf(model, processor, weights, spec, fmt, tmp, meta, source_gguf=source_gguf)
        else:
            state_dict = CheckpointPlan(model, weights, spec, with_g_idx=FORMATS[fmt].with_g_idx, head=head)
            qconfig = quantization_config(model, weights, spec, fmt, meta, head=head)
            _write_repo(
                tmp, model, processor, state_dict, qconfig, fmt, max_shard_size, untie=head is not None
            )
        fsync_dir(tmp)
        replace_dir(tmp, out_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _os_error(exc, fmt, out_dir, state_dict, model, weights) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote the %s export to %s", fmt, out_dir)


def check_shard_size(value: int | str) -> int:
    """The shard size in bytes ("5GB", "500MB", 1000000); one-line HubtoolError when it is not one."""
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        size = value if isinstance(value, int) else parse_size_to_int(str(value))
    except (ValueError, TypeError):
        size = 0
    if size <= 0:
        raise HubtoolError(
            f"--max-shard-size {value!r} is not a size", "give e.g. 5GB, 500MB or a number of bytes"
        )
    return size


# -- tensors ---------------------------------------------------------------------------------------
def _check_names(model: nn.Module, weights: Mapping[str, IntWeight]) -> None:
    """Every entry must name an nn.Linear of the model (shapes are checked as each one is packed)."""
    if not weights:
        raise ValueError("export_format needs at least one quantized linear")
    for name in weights:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{name} is not a module of {type(model).__name__}") from None
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"{name} is a {type(mod).__name__}, not an nn.Linear")


def _check_weight(name: str, iw: IntWeight, shape: tuple[int, ...], spec: QuantSpec) -> None:
    """An IntWeight must have its linear's shape and the spec's group size and bits."""
    if tuple(iw.shape) != tuple(shape):
        raise ValueError(f"{name}: IntWeight {tuple(iw.shape)} != weight {tuple(shape)}")
    if iw.group_size != spec.group_size or iw.bits != spec.bits:
        raise ValueError(f"{name}: IntWeight g{iw.group_size}/{iw.bits}b does not match the spec")


class CheckpointPlan(Mapping[str, torch.Tensor]):
    """The checkpoint's tensors, made one at a time: GPTQ tensors for ``weights``, the model's own for the rest.

    Keys follow what ``save_pretrained`` writes (tied duplicates dropped, legacy key layouts restored).
    ``head``: a quantized lm_head whose tensors take the place of its 16-bit weight.
    :attr:`entries` gives every tensor's shape and dtype (on the meta device) without making any;
    ``plan[key]`` makes one (on the CPU, contiguous): packed from its codes, taken from the model, or
    read from the source checkpoint for a streamed model.
    """

    def __init__(
        self,
        model: nn.Module,
        weights: Mapping[str, IntWeight],
        spec: QuantSpec,
        *,
        with_g_idx: bool,
        head: HeadWeights | None = None,
    ):
        self.model, self.weights, self.spec, self.with_g_idx = model, weights, spec, with_g_idx
        sd = dict(model.state_dict())
        for key in getattr(model, "_keys_to_ignore_on_save", None) or []:
            sd.pop(key, None)
        shapes = {name: tuple(sd.pop(f"{name}.weight").shape) for name in weights}
        if head is not None:  # before the tied duplicates go: the embedding it was tied to stays
            sd.pop(head.weight_key)
        sd = _drop_tied(model, sd)
        origin: dict[int, tuple[str, str, str]] = {id(t): ("model", k, k) for k, t in sd.items()}
        for key, t in (head.tensors if head is not None else {}).items():
            sd[key] = t
            origin[id(t)] = ("head", key, key)
        for name, shape in shapes.items():
            for key, t in _packed_shapes(name, shape, spec, with_g_idx).items():
                sd[key] = t
                origin[id(t)] = ("codes", name, key)
        self._shapes = shapes
        sd = _revert_key_layout(model, sd)
        self._origin = {k: (*origin[id(t)], t) for k, t in sd.items() if id(t) in origin}
        lost = [k for k in sd if k not in self._origin]
        if lost:  # a conversion made new tensors: only a model in memory can give them
            if any(t.is_meta for t in sd.values()):
                raise HubtoolError(
                    f"cannot write {type(model).__name__} from a streamed model: saving converts {lost[0]}",
                    "report this architecture to hubtool",
                )
            self._origin.update({k: ("tensor", k, k, sd[k]) for k in lost})
        self.entries = {k: t if t.is_meta else torch.empty_like(t, device="meta") for k, t in sd.items()}
        self._packed: tuple[str, dict[str, torch.Tensor]] | None = None

    def __getitem__(self, key: str) -> torch.Tensor:
        kind, name, own_key, t = self._origin[key]  # own_key: the key before the layout was reverted
        trim()  # the tensor written before this one is freed: its memory goes back first
        if kind == "codes":
            return self._pack(name)[own_key]
        if kind == "head":
            return t
        if t.is_meta:
            lazy = lazy_weights(self.model)
            if lazy is None:
                raise ValueError(f"{key} has no data (a meta tensor of a model that is not streamed)")
            if t.numel() * t.element_size() > COPY_CHUNK_BYTES:  # e.g. a 128k-row embedding: copied in blocks
                return lazy.tensor_chunks(name, t, COPY_CHUNK_BYTES)  # type: ignore[return-value]
            return lazy.tensor(name, t)
        return t.detach().to("cpu").contiguous()

    def _pack(self, name: str) -> dict[str, torch.Tensor]:
        """The GPTQ tensors of linear ``name`` (the last one packed is kept: its tensors are asked in turn)."""
        if self._packed is None or self._packed[0] != name:
            self._packed = None
            iw = self.weights[name]
            _check_weight(name, iw, self._shapes[name], self.spec)
            tensors = packing.pack(iw).as_dict(name, with_g_idx=self.with_g_idx)
            self._packed = (name, {k: v.contiguous() for k, v in tensors.items()})
        return self._packed[1]

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def _packed_shapes(
    name: str, shape: tuple[int, ...], spec: QuantSpec, with_g_idx: bool
) -> dict[str, torch.Tensor]:
    """The GPTQ tensors of a (N, K) linear as meta tensors (their shapes and dtypes, no data)."""
    n, k = shape
    g = spec.group_size
    iw = IntWeight(
        torch.empty(n, k, dtype=torch.uint8, device="meta"),
        torch.empty(n, k // g, dtype=torch.float32, device="meta"),
        torch.empty(n, k // g, dtype=torch.uint8, device="meta"),
        g,
        spec.bits,
    )
    return {key: t.to("meta") for key, t in packing.pack(iw).as_dict(name, with_g_idx=with_g_idx).items()}


def build_state_dict(
    model: nn.Module, weights: Mapping[str, IntWeight], *, with_g_idx: bool, spec: QuantSpec | None = None
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, all in memory (see :class:`CheckpointPlan`; small models and tests)."""
    if spec is None:
        iw = next(iter(weights.values()))
        spec = QuantSpec(iw.bits, iw.group_size, True)
    plan = CheckpointPlan(model, weights, spec, with_g_idx=with_g_idx)
    return {k: v if isinstance(v := plan[k], torch.Tensor) else torch.cat(list(v)) for k in plan}


def _drop_tied(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove tied duplicates the way save_pretrained does (safetensors cannot alias)."""
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:
        remove_tied_weights_from_state_dict = None
    if remove_tied_weights_from_state_dict is not None and hasattr(model, "all_tied_weights_keys"):
        return remove_tied_weights_from_state_dict(sd, model)
    seen: dict[tuple, str] = {}
    out = {}
    for k, v in sd.items():
        key = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            continue
        seen[key] = k
        out[k] = v
    return out


def _revert_key_layout(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename keys back to the checkpoint layout save_pretrained writes (e.g. LLaVA's language_model.model.*)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return sd
    try:
        return revert_weight_conversion(model, sd)
    except Exception as exc:  # a conversion that cannot invert packed tensors: keep the runtime names
        log.warning("keeping runtime tensor names (%s cannot revert them: %s)", type(model).__name__, exc)
        return sd


# -- config ----------------------------------------------------------------------------------------
def _names(items: Iterable[Any]) -> list[str]:
    out = []
    for it in items or []:
        if isinstance(it, str):
            out.append(it)
        elif isinstance(it, dict):
            out.append(it["name"])
        else:
            out.append(it.name)
    return out


def block_lists(weights: Iterable[str], meta: dict[str, Any]) -> list[str]:
    """The ModuleLists of blocks holding quantized linears (from meta, else from the names)."""
    given = list(meta.get("block_lists") or [])
    found: list[str] = []
    for name in weights:
        m = re.match(r"^(.*?)\.\d+\.", name)
        prefix = m.group(1) if m else name.rpartition(".")[0]
        if prefix not in found:
            found.append(prefix)
    return [b for b in given if any(f == b for f in found)] + [f for f in found if f not in given]


def skipped_in_blocks(model: nn.Module, weights: dict[str, IntWeight], blocks: list[str]) -> list[str]:
    """Linears inside the quantized block lists that stay 16-bit."""
    out = []
    for name, mod in model.named_modules():
        if (
            isinstance(mod, nn.Linear)
            and name not in weights
            and any(name.startswith(b + ".") for b in blocks)
        ):
            out.append(name)
    return out


def _calibration(meta: dict[str, Any]) -> dict[str, Any]:
    """meta["calibration"] as a dict (the pipeline passes CalibrationInfo as a dict, callers may pass a name)."""
    calib = meta.get("calibration")
    if not calib:
        return {}
    if isinstance(calib, str):
        return {"name": calib}
    if isinstance(calib, dict):
        return dict(calib)
    return {k: getattr(calib, k) for k in ("name", "source", "sha256", "nsamples", "seqlen", "batch_size")}


def _recipe_fields(meta: dict[str, Any]) -> dict[str, Any]:
    """auto-round's tuning fields: iters (0 for RTN and opt-RTN), and the calibration actually used."""
    method = meta.get("method") or "rtn"
    recipe = dict(meta.get("recipe") or {})
    calib = _calibration(meta)
    iters = 0 if method in ("rtn", "opt-rtn") else recipe.get("iters")
    out: dict[str, Any] = {"iters": iters}
    if method != "rtn":
        for key in ("nsamples", "seqlen", "batch_size"):
            value = calib.get(key) or recipe.get(key)
            if value:
                out[key] = value
        lr = recipe.get("lr") or recipe.get("learning_rate")
        if lr is None and iters:
            lr = 1.0 / iters
        if lr is not None and iters:
            out["lr"] = lr
        if calib.get("name"):
            out["dataset"] = calib["name"]
    return {k: v for k, v in out.items() if v is not None}


def quantization_config(
    model: nn.Module,
    weights: dict[str, IntWeight],
    spec: QuantSpec,
    fmt: str,
    meta: dict[str, Any],
    head: HeadWeights | None = None,
) -> dict[str, Any]:
    """The quantization_config block of config.json for ``fmt`` (``head``: a quantized lm_head, hubtool only)."""
    blocks = block_lists(weights, meta)
    skipped = skipped_in_blocks(model, weights, blocks)
    version = meta.get("hubtool_version") or __version__
    info = FORMATS[fmt]
    if fmt == "auto_round":
        qc: dict[str, Any] = {
            "bits": spec.bits,
            "group_size": spec.group_size,
            "sym": spec.sym,
            "data_type": "int",
            "block_name_to_quantize": ",".join(blocks),
            "quant_method": info.quant_method,
            "packing_format": info.packing_format,
            **_recipe_fields(meta),
        }
        if skipped:
            qc["extra_config"] = {name: {"bits": 16, "data_type": "float"} for name in skipped}
        qc["quantizer"] = f"hubtool {version} ({meta.get('method') or 'rtn'})"
        return qc
    if fmt == "auto_gptq":
        qc = {
            "bits": spec.bits,
            "group_size": spec.group_size,
            "sym": spec.sym,
            "desc_act": False,
            "static_groups": False,
            "true_sequential": False,
            "damp_percent": 0.01,
            "lm_head": False,
            "quant_method": info.quant_method,
            "checkpoint_format": info.packing_format,
            "format": info.packing_format,  # transformers 5's GPTQConfig name for checkpoint_format
            "block_name_to_quantize": ",".join(blocks),
            # provenance as auto-round writes it; no "meta" key: transformers reads one as GPTQModel's v2 format
            "provider": f"hubtool {version} ({meta.get('method') or 'rtn'})",
        }
        if skipped:
            per_block: dict[str, set[str]] = {}
            for name in weights:
                blk = next(b for b in blocks if name.startswith(b + "."))
                rel = name[len(blk) + 1 :].split(".", 1)[1]
                per_block.setdefault(blk, set()).add(rel)
            qc["modules_in_block_to_quantize"] = [sorted(per_block.get(b, ())) for b in blocks]
            # Linears skipped in some blocks only (e.g. --skip on one layer) need GPTQModel's dynamic rules.
            qc["dynamic"] = {f"-:^{re.escape(name)}$": {} for name in skipped}
        return qc
    qc = {
        "quant_method": info.quant_method,
        "bits": spec.bits,
        "group_size": spec.group_size,
        "sym": spec.sym,
        "packing_format": info.packing_format,
        "g_idx": info.with_g_idx,
        "modules": list(weights),
        "method": meta.get("method") or "rtn",
        "recipe": meta.get("recipe"),
        "calibration": _calibration(meta) or None,
        "hubtool_version": version,
    }
    if head is not None:  # int4: one more Int4Linear; int8: an Int8Linear (runtime.int8linear)
        qc["lm_head"] = head.mode
        if head.mode == "int4":
            qc["modules"].append(head.name)
        else:
            qc["int8_modules"] = [head.name]
    return qc


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype most floating-point parameters have (what config.json should call the model's dtype)."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def _config_for(model: nn.Module, qconfig: dict[str, Any], untie: bool = False) -> Any:
    """A copy of the model's config with quantization_config and the true dtype of its 16-bit tensors
    (``untie``: the lm_head is stored apart from the embedding, so the config no longer ties them)."""
    config = copy.deepcopy(model.config)
    dtype = _model_dtype(model)
    for sub in _sub_configs(config):
        if getattr(sub, "dtype", None) is not None:
            sub.dtype = dtype
        if untie and getattr(sub, "tie_word_embeddings", False):
            sub.tie_word_embeddings = False
        if hasattr(sub, "quantization_config"):
            del sub.quantization_config
    config.dtype = dtype
    config.quantization_config = qconfig
    return config


def _sub_configs(config: Any) -> list[Any]:
    subs = [config]
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            subs.append(sub)
    return subs


# -- files -----------------------------------------------------------------------------------------
def _write_repo(
    tmp: Path,
    model: nn.Module,
    processor: Any,
    state_dict: CheckpointPlan,
    qconfig: dict[str, Any],
    fmt: str,
    max_shard_size: int | str,
    untie: bool = False,
) -> None:
    write_safetensors(state_dict, tmp, max_shard_size)
    config = _config_for(model, qconfig, untie)
    config.save_pretrained(tmp)
    # transformers 5 writes "dtype"; loaders built on transformers < 4.56 read "torch_dtype".
    data = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
    if data.get("dtype") is not None:
        data["torch_dtype"] = data["dtype"]
        _write_json(tmp / "config.json", data)
    side_config = FORMATS[fmt].side_config  # auto-round's own tools, AutoGPTQ / GPTQModel read these
    if side_config:
        _write_json(tmp / side_config, qconfig)
    gen = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", lambda: False)()
    if gen is not None and can_generate:
        gen.save_pretrained(tmp)
    if processor is not None:
        processor.save_pretrained(tmp)
    else:
        log.warning("no tokenizer or processor given: the %s export has none", fmt)
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            fsync_file(p)


def write_safetensors(
    state_dict: Mapping[str, torch.Tensor], folder: Path, max_shard_size: int | str
) -> list[str]:
    """Write ``model.safetensors`` or shards + ``model.safetensors.index.json``; return the file names.

    ``state_dict`` may make its tensors when asked (a :class:`CheckpointPlan`): they are asked for one at
    a time, shard by shard, and written straight to the file.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    entries = getattr(state_dict, "entries", None) or {
        k: torch.empty_like(t, device="meta") for k, t in state_dict.items()
    }
    split = split_torch_state_dict_into_shards(
        entries, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    names = []
    for filename, keys in split.filename_to_tensors.items():
        _save_safetensors({k: entries[k] for k in keys}, state_dict.__getitem__, folder / filename)
        names.append(filename)
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": dict(split.tensor_to_filename)}
        _write_json(folder / INDEX_NAME, index)
        names.append(INDEX_NAME)
    return names


def _save_safetensors(
    tensors: dict[str, torch.Tensor], produce: Callable[[str], torch.Tensor], path: Path
) -> None:
    """One safetensors file, tensor by tensor (``produce`` makes each), read back to check it."""
    from safetensors import safe_open

    write_safetensors_streamed(tensors, produce, path, metadata=SAFETENSORS_METADATA)
    with safe_open(str(path), framework="pt") as f:  # read the header back: a short file fails here
        if len(list(f.keys())) != len(tensors):
            raise OSError(errno.EIO, "safetensors file reads back incomplete", str(path))


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _remove_stale(out_dir: Path) -> None:
    """Delete hidden partial/old folders that a killed export of ``out_dir`` left behind."""
    for p in out_dir.parent.glob(f".{out_dir.name}.*-*-*"):
        m = re.fullmatch(rf"\.{re.escape(out_dir.name)}\.(partial|old)-(\d+)-[0-9a-f]{{8}}", p.name)
        if m and not _alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # this process cleans up its own temp folders (unless killed, and then it is gone)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _export_bytes(
    model: nn.Module, weights: dict[str, Any], fmt: str, state_dict: dict[str, torch.Tensor] | None
) -> int:
    """Bytes of tensors an export writes: its state dict's if built, else estimated from the shapes."""
    if state_dict:
        entries = getattr(state_dict, "entries", state_dict)
        return sum(t.numel() * t.element_size() for t in entries.values())
    saved = set(model.state_dict())
    total = 0
    tensors = [*model.named_parameters(), *model.named_buffers()]  # tied parameters come once
    for name, t in tensors:
        if name in saved and name.removesuffix(".weight") not in weights:
            total += t.numel() * t.element_size()
    for name, w in weights.items():
        n, k = model.get_submodule(name).weight.shape
        groups = k // w.group_size
        # qweight (K/8 x N int32), qzeros (K/G x N/8 int32), scales (K/G x N fp16), g_idx (K int32)
        total += k * n // 2 + groups * n // 2 + groups * n * 2 + (4 * k if ALL_FORMATS[fmt].with_g_idx else 0)
    return total


def _size_text(n: int) -> str:
    """4_300_000 -> '4.3 MB' (decimal units, as disk sizes are shown)."""
    if n < 1000:
        return f"{n} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            break
    return f"{n:.1f} {unit}"


def _os_error(
    exc: OSError,
    fmt: str,
    out_dir: Path,
    state_dict: dict[str, torch.Tensor] | None,
    model: nn.Module,
    weights: dict[str, Any],
) -> HubtoolError:
    if exc.errno in _DISK_FULL:
        need = _export_bytes(model, weights, fmt, state_dict)
        hint = "free some space and run again"
        if need:  # the partial folder was removed: the whole export is still to write
            hint = f"the {fmt} export needs about {_size_text(need)} free; " + hint
        return HubtoolError(f"disk full while writing the {fmt} export to {out_dir}", hint)
    return HubtoolError(f"cannot write the {fmt} export to {out_dir}: {exc.strerror or exc}")
