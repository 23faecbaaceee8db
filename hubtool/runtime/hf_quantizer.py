"""How transformers loads int4 onto Int4Linear: the ``hubtool`` quantization config and its HfQuantizer.

After ``register()`` (run by ``hubtool.load``, and by ``import hubtool`` through ``integrations``),
``AutoModelForCausalLM.from_pretrained(dir)`` (or the image-text Auto class) on a folder whose config.json
holds ``{"quant_method": "hubtool", ...}`` builds the model on the meta device, swaps every listed
``nn.Linear`` for an ``Int4Linear`` before the weights load (``swap_in_int4``), and lets transformers' own
loader fill the GPTQ buffers (qweight / qzeros / scales [/ g_idx] / bias); gptq_v2 and AWQ layouts are
converted to GPTQ v1 after (``to_gptq_v1``). ``hubtool.load`` (``runtime.loader``) uses the same
quantizer for auto_round and GPTQ checkpoints of other tools.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..core import packing
from ..core.intweight import IntWeight
from ..core.memory import trim
from ..errors import HubtoolError
from ..formats.table import FORMATS, PACKING_AWQ, PACKING_V1, PACKING_V2, PACKINGS
from .compile_cache import static_cache_full_layers
from .dense import use_dense_kernel
from .fused_norms import use_fused_norms
from .fused_rope import use_fused_rope
from .int4linear import Int4Linear, replace_linears
from .int8linear import Int8Linear

log = logging.getLogger(__name__)

QUANT_METHOD = FORMATS["hubtool"].quant_method
_AWQ_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column j of each 8 sits in nibble _AWQ_ORDER[j]

_registered = False


class HubtoolConfig(QuantizationConfigMixin):
    """quantization_config of a hubtool checkpoint: int4 GPTQ-packed linears, listed by module name.

    ``int8_modules`` (a quantized lm_head) load as ``Int8Linear``. ``modules`` are the model's module paths (as ``named_modules()`` shows them once loaded; checkpoint
    paths of older layouts are resolved too). ``packing_format`` is ``gptq`` (zero-1 in qzeros, what
    hubtool writes), ``gptq_v2`` or ``awq`` (both converted to ``gptq`` as they load). ``method`` / ``recipe`` / ``calibration`` / ``hubtool_version`` record how the weights
    were made; ``backend`` (not saved by hubtool) pins a kernel backend at load time.
    """

    def __init__(
        self,
        modules: list[str] | None = None,
        bits: int = 4,
        group_size: int = 128,
        sym: bool = True,
        packing_format: str = PACKING_V1,
        g_idx: bool = False,
        method: str | None = None,
        recipe: dict[str, Any] | None = None,
        calibration: dict[str, Any] | str | None = None,
        hubtool_version: str | None = None,
        group_sizes: dict[str, int] | None = None,
        int8_modules: list[str] | None = None,
        lm_head: str | None = None,
        backend: str | None = None,
        source_quantization_config: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        self.quant_method = QUANT_METHOD
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        self.packing_format = packing_format
        self.g_idx = g_idx
        self.modules = list(modules or [])
        self.method = method
        self.recipe = recipe
        self.calibration = calibration
        self.hubtool_version = hubtool_version
        if group_sizes:
            self.group_sizes = dict(group_sizes)
        if int8_modules:  # a quantized lm_head (--quantize-lm-head int8): Int8Linear
            self.int8_modules = list(int8_modules)
        if lm_head is not None:  # how the lm_head is stored: "int8" or "int4" (one of the modules)
            self.lm_head = lm_head
        if backend is not None:
            self.backend = backend
        if source_quantization_config is not None:
            self.source_quantization_config = source_quantization_config
        for key, value in kwargs.items():
            if key != "quant_method":
                setattr(self, key, value)
        self.post_init()

    def post_init(self) -> None:
        """Check the fields transformers cannot check for us."""
        if self.bits != 4:
            raise ValueError(f"hubtool checkpoints hold int4 weights, got bits={self.bits}")
        if self.packing_format not in PACKINGS:
            raise ValueError(f"unknown hubtool packing_format {self.packing_format!r}")
        for key in ("modules", "int8_modules"):
            names = getattr(self, key, [])
            if not isinstance(names, list) or not all(isinstance(m, str) for m in names):
                raise ValueError(f"hubtool quantization_config.{key} must be a list of module names")

    def to_dict(self) -> dict[str, Any]:
        """The config.json block (a load-time ``backend`` choice is not saved)."""
        out = super().to_dict()
        out.pop("backend", None)
        return out

    def group_size_of(self, name: str) -> int:
        """Group size of one module (a per-module override, else the global one)."""
        return int(getattr(self, "group_sizes", {}).get(name, self.group_size))


class HubtoolHfQuantizer(HfQuantizer):
    """Loads hubtool (and, through ``hubtool.load``, auto_round / GPTQ) int4 checkpoints onto Int4Linear."""

    requires_calibration = True  # only pre-quantized checkpoints: `hubtool quantize` makes them

    def __init__(self, quantization_config: Any, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.module_names: list[str] = []

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        """Nothing beyond torch is needed; refuse quantize-on-load."""
        if not self.pre_quantized:
            raise ValueError(
                "hubtool quantizes with `hubtool quantize`; transformers can only load the result"
            )

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        """Swap the listed linears (still on the meta device) for Int4Linear, and ``int8_modules`` for Int8Linear."""
        self.module_names = swap_in_int4(model, self.quantization_config)
        self.module_names += swap_in_int8(model, self.quantization_config)
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        """Convert gptq_v2 / AWQ layouts to GPTQ v1 (the config then says v1, for a save_pretrained); on the
        CPU, repack every layer for the kernel now and keep that one copy (``Int4Linear.compact``); let the
        16-bit linears left (the lm_head above all) run hubtool's dense kernel at small M (``runtime.dense``),
        and the RMSNorms and rotary embeddings one C++ pass each in eager CPU inference
        (``runtime.fused_norms``, ``runtime.fused_rope``); a static cache of sliding-window layers that
        compiles once (``runtime.compile_cache``)."""
        to_gptq_v1(model, self.quantization_config.packing_format)
        self.quantization_config.packing_format = PACKING_V1
        compact_all(model)
        use_dense_kernel(model, getattr(self.quantization_config, "backend", None))
        use_fused_norms(model)
        use_fused_rope(model)
        static_cache_full_layers(model)
        return model

    @property
    def is_trainable(self) -> bool:
        """int4 buffers hold no gradients."""
        return False

    @property
    def is_compileable(self) -> bool:
        """torch.compile traces the int4 layers: the kernels are custom ops with fake implementations, and
        the CPU layout is made at load (``Int4Linear.compact``), never inside a traced call."""
        return True

    def is_serializable(self, safe_serialization: Any = None) -> bool:
        """save_pretrained writes the same GPTQ tensors back under the same config."""
        return True

    def _dequantize(self, model: Any, dtype: Any = None) -> Any:
        """Replace every Int4Linear by a dense nn.Linear holding its dequantized weight."""
        return dequantize_int4(model, dtype)


def swap_in_int4(model: nn.Module, qc: HubtoolConfig) -> list[str]:
    """Swap the linears ``qc`` lists (still on the meta device) for Int4Linear; return the model's names of them."""
    resolved = resolve_module_names(model, qc.modules)
    backend = getattr(qc, "backend", None)

    def factory(name: str, old: nn.Module) -> nn.Module:
        if not isinstance(old, nn.Linear):
            raise HubtoolError(
                f"{name} is a {type(old).__name__}, not a Linear: hubtool cannot load it as int4"
            )
        group_size = qc.group_size_of(resolved[name])
        if group_size == -1:  # GPTQ's per-channel: one group across the whole input
            group_size = old.in_features
        try:
            return Int4Linear(
                old.in_features,
                old.out_features,
                bias=old.bias is not None,
                group_size=group_size,
                bits=qc.bits,
                dtype=old.weight.dtype,
                with_g_idx=bool(qc.g_idx),
                backend=backend,
                device=old.weight.device,
            )
        except ValueError as exc:
            raise HubtoolError(f"cannot load {name} as int4: {exc}") from None

    replace_linears(model, list(resolved), factory)
    if qc.packing_format == PACKING_AWQ:  # receive AWQ's layout; converted after loading
        for name in resolved:
            layer = model.get_submodule(name)
            dev = layer.qweight.device
            n, k, groups = layer.out_features, layer.in_features, layer.scales.shape[0]
            layer.qweight = torch.zeros(k, n // 8, dtype=torch.int32, device=dev)
            layer.qzeros = torch.zeros(groups, n // 8, dtype=torch.int32, device=dev)
    log.debug("swapped %d linears for Int4Linear", len(resolved))
    return list(resolved)


def swap_in_int8(model: nn.Module, qc: HubtoolConfig) -> list[str]:
    """Swap the linears ``qc.int8_modules`` lists (still on the meta device) for Int8Linear; return their names."""
    names = list(resolve_module_names(model, list(getattr(qc, "int8_modules", []))))

    def factory(name: str, old: nn.Module) -> nn.Module:
        if not isinstance(old, nn.Linear):
            raise HubtoolError(
                f"{name} is a {type(old).__name__}, not a Linear: hubtool cannot load it as int8"
            )
        return Int8Linear(
            old.in_features,
            old.out_features,
            bias=old.bias is not None,
            dtype=old.weight.dtype,
            backend=getattr(qc, "backend", None),
            device=old.weight.device,
        )

    replace_linears(model, names, factory)
    return names


def to_gptq_v1(model: nn.Module, packing_format: str) -> None:
    """Convert loaded gptq_v2 / AWQ layers to GPTQ v1 and drop kernel state prepared before the weights arrived."""
    for name, module in model.named_modules():
        if not isinstance(module, Int4Linear):
            continue
        if packing_format == PACKING_V2:
            _v2_zeros_to_v1(name, module)
        elif packing_format == PACKING_AWQ:
            _awq_to_v1(name, module)
        module.forget_prepared()


def compact_all(model: nn.Module) -> int:
    """``Int4Linear.compact`` on every layer the CPU kernel serves; returns how many."""
    done = sum(m.compact() for m in model.modules() if isinstance(m, Int4Linear))
    trim()
    log.debug("%d int4 linears hold only the CPU kernel's layout", done)
    return done


def dequantize_int4(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every Int4Linear (and Int8Linear) by a dense nn.Linear holding its dequantized weight."""
    names = [n for n, m in model.named_modules() if isinstance(m, Int4Linear | Int8Linear)]

    def factory(name: str, old: Int4Linear | Int8Linear) -> nn.Module:
        w = old.dequantize(torch.float32)
        target = dtype or (old.bias.dtype if old.bias is not None else torch.bfloat16)
        lin = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, device=w.device)
        lin = lin.to(target)
        with torch.no_grad():
            lin.weight.copy_(w.to(target))
            if old.bias is not None:
                lin.bias.copy_(old.bias.to(target))
        return lin

    replace_linears(model, names, factory)
    return model


def _unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """AWQ int32 (R, C/8) -> uint8 (R, C) in column order."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF  # (R, C/8, 8): nibble i
    cols = nibbles[..., list(_AWQ_ORDER)]  # column j is nibble _AWQ_ORDER[j]
    return cols.reshape(packed.shape[0], -1).to(torch.uint8)


def _awq_to_v1(name: str, module: Int4Linear) -> None:
    """Repack a layer loaded in AWQ layout into GPTQ v1 (what Int4Linear computes from)."""
    q = _unpack_awq(module.qweight.cpu())  # (K, N)
    zero = _unpack_awq(module.qzeros.cpu())  # (G, N), stored as is
    _refuse_zero_points_of_0(name, zero)
    iw = IntWeight(
        q=q.t().contiguous(),
        scale=module.scales.cpu().t().float().contiguous(),
        zero=zero.t().contiguous(),
        group_size=module.group_size,
    )
    t = packing.pack(iw)
    module.qweight = t.qweight.to(module.scales.device)
    module.qzeros = t.qzeros.to(module.scales.device)


def _refuse_zero_points_of_0(name: str, zero: torch.Tensor) -> None:
    if bool((zero == 0).any()):
        raise HubtoolError(
            f"{name} has a zero point of 0, which GPTQ v1 packing (hubtool's Int4Linear) cannot hold",
            "re-export the checkpoint with GPTQ v1 packing (zero points 1..15)",
        )


def _v2_zeros_to_v1(name: str, module: Int4Linear) -> None:
    """Rewrite a gptq_v2 layer's qzeros (zero stored as is) into v1 (zero-1), refusing zero points of 0."""
    t = module.packed_tensors()
    iw = packing.unpack(packing.GPTQTensors(t.qweight, t.qzeros, t.scales))
    zero = iw.zero.to(torch.int32) - 1  # unpack read the nibble as v1 (+1); v2's zero is the nibble itself
    _refuse_zero_points_of_0(name, zero)
    iw.zero = zero.to(torch.uint8)
    qzeros = packing.pack(iw).qzeros
    module.qzeros = qzeros.to(module.qzeros.device)


def resolve_module_names(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Map module names (the model's own, or a checkpoint's older layout) to the model's paths: {model: given}."""
    modules = dict(model.named_modules())
    out: dict[str, str] = {}
    pending = []
    for name in names:
        if name in modules:
            out[name] = name
        else:
            pending.append(name)
    if pending:
        renamed = _rename_checkpoint_keys(model, [f"{n}.weight" for n in pending])
        missing = []
        for name, key in zip(pending, renamed, strict=True):
            target = key.removesuffix(".weight") if key else None
            if target and target in modules:
                out[target] = name
            else:
                missing.append(name)
        if missing:
            raise HubtoolError(
                f"the checkpoint quantizes {len(missing)} module(s) this {type(model).__name__} does not have, "
                f"e.g. {missing[0]!r}",
                "the checkpoint's config.json and weights do not match this transformers version's model",
            )
    return out


def _rename_checkpoint_keys(model: nn.Module, keys: list[str]) -> list[str | None]:
    """Apply transformers' checkpoint-key renaming (legacy layouts -> this version's module paths)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # an older/newer transformers without this API: nothing to rename
        return [None] * len(keys)
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    meta_sd = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None
    out: list[str | None] = []
    for key in keys:
        try:
            renamed, _ = rename_source_key(key, renamings, converters, prefix, meta_sd)
        except Exception:  # a mapping that cannot apply to this key: leave it unresolved
            renamed = None
        out.append(renamed)
    return out


def register() -> None:
    """Register the ``hubtool`` quantization config and quantizer with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    cfg, quantizer = HubtoolConfig, HubtoolHfQuantizer
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not cfg:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)  # a stale class from a reloaded module
        register_quantization_config(QUANT_METHOD)(cfg)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not quantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(quantizer)
    _registered = True
