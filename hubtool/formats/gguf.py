"""Write a quantized model as one GGUF file, with the tuned int4 codes as they are (no requantization).

``gguf_q4_0`` is llama.cpp's Q4_0: per 32 weights of a row, an fp16 scale ``d`` and 32 4-bit codes with
``W = d * (q - 8)``, which is hubtool's symmetric int4 spec at group size 32 (``QuantSpec(4, 32, True)``:
the tuned scale is already fp16-exact and the zero point is 8), so each block is written from the codes
bit for bit. llama.cpp's own ``quantize_row_q4_0_ref`` picks ``d = max / -8`` (``max`` the signed value
of largest magnitude) and ``q = min(15, (int)(w / d + 8.5))``: the same rule as hubtool's full-range RTN,
up to rounding ties and the scale being rounded to fp16 before the codes are chosen (hubtool's choice).

Names and metadata follow llama.cpp's ``convert_hf_to_gguf.py`` (the ``gguf`` package's architecture and
tensor-name tables), with its per-architecture changes: Llama's q/k rows permuted for its rotary layout,
Gemma 3's norms stored as ``1 + w``, Phi-3's fused ``qkv`` and ``gate_up`` kept fused. Tensors left
16-bit (embeddings, output, norms, biases, skipped linears) are written as the converter writes them:
1-D in F32, 2-D in the model's 16-bit type (BF16 or F16). The tokenizer, its special tokens and the chat
template come from the source GGUF when the source is one (copied as is), else from the tokenizer
(byte-level BPE, llama.cpp's ``gpt2`` model, with ``gguf.SpecialVocab``). The file is written tensor by
tensor (``GGUFWriter``'s header, then each tensor's bytes), so the model is never whole in memory.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.intweight import IntWeight, kquant_fit, quantize_kquant
from ..core.lazy import lazy_weights
from ..core.spec import QuantSpec
from ..errors import HubtoolError
from .kquants import q4_k_bytes, quantize_q5_k, quantize_q6_k

log = logging.getLogger(__name__)

# hubtool's model_type -> the gguf package's architecture name (llama.cpp's general.architecture)
ARCHITECTURES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
}
SUPPORTED = ("llama", "qwen2", "gemma3", "phi3")
Q4_0_BLOCK = 32  # weights per Q4_0 block
Q4_0_BYTES = 18  # fp16 scale + 16 bytes of nibbles


@dataclass(frozen=True)
class GgufType:
    """One GGUF quantization type hubtool writes: its format name, llama.cpp's names and the spec it tunes."""

    fmt: str  # the format's name in hubtool ("gguf_q4_0")
    alias: str  # how --formats may also spell it ("gguf:q4_0")
    label: str  # llama.cpp's name, in the file name ("Q4_0")
    file_type: int  # general.file_type (gguf.LlamaFileType)
    spec: QuantSpec  # the storage spec the codes must be tuned in


GGUF_TYPES: dict[str, GgufType] = {
    "gguf_q4_0": GgufType("gguf_q4_0", "gguf:q4_0", "Q4_0", 2, QuantSpec(4, Q4_0_BLOCK, True)),
    "gguf_q4_k_m": GgufType("gguf_q4_k_m", "gguf:q4_k_m", "Q4_K_M", 15, QuantSpec(4, 32, False, kquant=True)),
}
DEFAULT = "gguf_q4_k_m"  # what plain ``--formats gguf`` writes
# llama.cpp's fallback when a row does not split into 256-blocks (llama-quant.cpp, tensor_type_fallback)
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of a written GGUF: its name there, the model's name for it, its type and shape (N, K)."""

    name: str
    source: str
    type: str  # "Q4_0", "BF16", "F16", "F32"
    shape: tuple[int, ...]


def canonical_format(name: str) -> str | None:
    """The hubtool format name of a GGUF spelling ("gguf:q4_0" -> "gguf_q4_0"); None when not a GGUF one."""
    key = name.strip().lower()
    if key == "gguf":
        return DEFAULT
    for t in GGUF_TYPES.values():
        if key in (t.fmt, t.alias):
            return t.fmt
    return None


def is_gguf(fmt: str) -> bool:
    """Whether ``fmt`` is a GGUF format."""
    return fmt in GGUF_TYPES


def architecture(model_type: str) -> str | None:
    """llama.cpp's architecture for a transformers model_type, or None when hubtool cannot write it as GGUF."""
    return ARCHITECTURES.get(model_type)


def check_gguf_request(model_type: str, fmt: str, spec: QuantSpec) -> None:
    """One-line HubtoolError, before anything is quantized, when ``fmt`` cannot be written for this model/spec."""
    if architecture(model_type) is None:
        raise HubtoolError(
            f"GGUF export does not support the {model_type or 'unknown'} architecture "
            f"(supported: {', '.join(SUPPORTED)})",
            "drop " + GGUF_TYPES[fmt].alias,
        )
    want = GGUF_TYPES[fmt].spec
    if want.kquant and spec != want:
        raise HubtoolError(
            f"{GGUF_TYPES[fmt].alias} is tuned in llama.cpp's Q4_K parameterization (6-bit scales and "
            "minimums per 32 weights), which no other format stores",
            f"quantize it in a run of its own: --formats {GGUF_TYPES[fmt].alias}",
        )
    if spec != want:
        raise HubtoolError(
            f"{GGUF_TYPES[fmt].alias} stores int4 in symmetric groups of {want.group_size}, "
            f"not {'' if spec.sym else 'a'}symmetric groups of {spec.group_size}",
            f"add --group-size {want.group_size} --sym (the other formats then use it too)",
        )


def llama_cpp_attention_scale(config: Any) -> float | None:
    """The attention scale llama.cpp uses for a Gemma 3 text config (1/sqrt(head_dim); 1/sqrt(hidden/heads)
    for the 62-layer 27B), or None for the other architectures (the scale is 1/sqrt(head_dim) in both)."""
    if getattr(config, "model_type", "") not in ("gemma3", "gemma3_text"):
        return None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if config.num_hidden_layers == 62:
        return (config.hidden_size // config.num_attention_heads) ** -0.5
    return head_dim**-0.5


def check_gguf_config(config: Any) -> None:
    """One-line HubtoolError when the model computes something a GGUF cannot say to llama.cpp (Gemma 3's
    query_pre_attn_scalar is not stored: llama.cpp derives the attention scale from the shapes)."""
    config = getattr(config, "text_config", None) or config
    want = llama_cpp_attention_scale(config)
    qpas = getattr(config, "query_pre_attn_scalar", None)
    if want is not None and qpas is not None and abs(qpas**-0.5 - want) > 1e-6 * want:
        raise HubtoolError(
            f"GGUF export: this Gemma 3 scales attention by 1/sqrt({qpas}), llama.cpp by {want:.6g} "
            "(it derives the scale from head_dim; the file cannot say otherwise)",
            "drop the GGUF format for this model",
        )


def file_name(model_name: str, fmt: str) -> str:
    """The GGUF's file name: NAME-TYPE.gguf (the Hub reads the type from it)."""
    base = model_name.rstrip("/").split("/")[-1]
    base = base[: -len(".gguf")] if base.lower().endswith(".gguf") else base  # a GGUF source: its stem
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in base)
    return f"{stem or 'model'}-{GGUF_TYPES[fmt].label}.gguf"


# -- tensors ---------------------------------------------------------------------------------------
def q4_0_blocks(iw: IntWeight) -> np.ndarray:
    """The Q4_0 bytes (N, K / 32 * 18) of codes tuned with the Q4_0 spec: per block fp16 d, then 16 bytes
    whose low nibbles hold values 0..15 and high nibbles 16..31."""
    n, k = iw.shape
    if iw.bits != 4 or iw.group_size != Q4_0_BLOCK or k % Q4_0_BLOCK:
        raise ValueError(f"Q4_0 needs 4-bit codes in groups of 32, got g{iw.group_size}/{iw.bits}b, K={k}")
    if not bool((iw.zero == 8).all()):
        raise ValueError("Q4_0 is symmetric: every zero point must be 8")
    d = iw.scale.to(torch.float16)
    if not torch.equal(d.float(), iw.scale.float()):
        raise ValueError("Q4_0 stores fp16 scales: the tuned scales must be fp16-exact")
    q = iw.q.to(torch.uint8).reshape(n, k // Q4_0_BLOCK, Q4_0_BLOCK)
    nibbles = q[..., :16] | (q[..., 16:] << 4)
    blocks = torch.cat([d.contiguous().view(torch.uint8).reshape(n, k // Q4_0_BLOCK, 2), nibbles], dim=-1)
    return blocks.reshape(n, -1).numpy()


def q4_0_dequantize(blocks: np.ndarray, k: int) -> torch.Tensor:
    """Dense float32 (N, K) of Q4_0 bytes (the inverse of :func:`q4_0_blocks`; tests and checks)."""
    b = torch.from_numpy(np.ascontiguousarray(blocks)).reshape(-1, k // Q4_0_BLOCK, Q4_0_BYTES)
    d = b[..., :2].contiguous().view(torch.float16).float()
    q = torch.cat([b[..., 2:] & 0xF, b[..., 2:] >> 4], dim=-1).float()
    return (d * (q - 8)).reshape(-1, k)


def _llama_permute(rows: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """convert_hf_to_gguf's LlamaModel.permute on the first dimension (rows, or per-row scales/codes)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _permute_intweight(iw: IntWeight, n_head: int, n_head_kv: int | None) -> IntWeight:
    def rows(t: torch.Tensor) -> torch.Tensor:
        return _llama_permute(t, n_head, n_head_kv).contiguous()

    kq = iw.kquant.permute_rows(rows) if iw.kquant is not None else None
    return IntWeight(rows(iw.q), rows(iw.scale), rows(iw.zero), iw.group_size, iw.bits, kq)


def _text_config(model: nn.Module) -> Any:
    cfg = model.config
    return getattr(cfg, "text_config", None) or cfg


def _permutation(arch: str, config: Any, name: str) -> tuple[int, int | None] | None:
    """(n_head, n_head_kv) for Llama's q/k rows, else None."""
    if arch != "llama":
        return None
    if name.endswith("q_proj.weight"):
        return config.num_attention_heads, config.num_attention_heads
    if name.endswith("k_proj.weight"):
        return config.num_attention_heads, config.num_key_value_heads
    return None


def _dense_type(t: torch.Tensor, name: str) -> str:
    if t.dim() == 1 or name.endswith(".bias"):
        return "F32"
    return {torch.bfloat16: "BF16", torch.float16: "F16"}.get(t.dtype, "F32")


def _dense_bytes(t: torch.Tensor, kind: str) -> np.ndarray:
    if kind == "F32":
        return t.float().contiguous().numpy()
    if kind == "F16":
        return t.to(torch.float16).contiguous().numpy()
    return t.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()  # BF16: its raw bytes


@dataclass
class _Entry:
    name: str  # GGUF name
    source: str  # the model's linear (tuned codes) or tensor name
    type: str
    shape: tuple[int, ...]
    meta: torch.Tensor  # the model's tensor (maybe meta)
    tuned: bool  # written from hubtool's codes (else from the 16-bit tensor)


def plan_tensors(
    model: nn.Module, weights: Mapping[str, IntWeight], arch: str, fmt: str = "gguf_q4_0"
) -> list[GgufTensor]:
    """Which tensor of the model becomes which GGUF tensor, with its type (what the record lists)."""
    return [GgufTensor(e.name, e.source, e.type, e.shape) for e in _entries(model, weights, arch, fmt)]


def _drop_tied(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without tied duplicates (the output tied to the embeddings), as save_pretrained drops them."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    return remove_tied_weights_from_state_dict(sd, model)


def _named_tensors(model: nn.Module, arch: str) -> list[tuple[str, str, torch.Tensor]]:
    """(GGUF name, state-dict key, tensor) of every tensor the file holds, in state-dict order."""
    import gguf

    config = _text_config(model)
    sd = _drop_tied(model, dict(model.state_dict()))
    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    out = []
    for key, t in sd.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        hf = key.removeprefix("model.language_model.").removeprefix("language_model.")
        hf = "model." + hf.removeprefix("model.") if not hf.startswith("lm_head") else hf
        target = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise HubtoolError(
                f"GGUF ({arch}): no llama.cpp name for tensor {key}", "report this model to hubtool"
            )
        out.append((target, key, t))
    return out


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def q4_k_m_type(name: str, shape: tuple[int, ...], n_layer: int, tied: bool) -> str:
    """The type llama.cpp's Q4_K_M mix gives a 2-D tensor (llama-quant.cpp's rules for these
    architectures): the output (or a tied embedding) Q6_K; attn_v and ffn_down Q6_K in the layers of
    use_more_bits; a fused attn_qkv Q5_K; the rest Q4_K; a 256-block type falls back when K is not a multiple."""
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        kind = "Q6_K"
    elif (name.endswith("attn_v.weight") or name.endswith("ffn_down.weight")) and _more_bits(layer, n_layer):
        kind = "Q6_K"
    elif name.endswith("attn_qkv.weight"):
        kind = "Q5_K"
    else:
        kind = "Q4_K"
    k = shape[-1]
    if k % 256:
        kind = FALLBACK[kind]
    return kind if k % 32 == 0 else "F16"


def kept_out_of_int4(model: nn.Module, fmt: str) -> dict[str, str]:
    """Linears the GGUF type stores in another type than its tuned int4 (name -> why), for the quantize plan."""
    if not GGUF_TYPES[fmt].spec.kquant:
        return {}
    config = _text_config(model)
    arch = architecture(getattr(config, "model_type", "") or "")
    tensors = _named_tensors(model, arch)
    tied = not any(n == "output.weight" for n, _, _ in tensors)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    out = {}
    for target, key, t in tensors:
        linear = key.removesuffix(".weight")
        if t.dim() == 2 and key.endswith(".weight") and linear in linears:
            kind = q4_k_m_type(target, tuple(t.shape), config.num_hidden_layers, tied)
            if kind != "Q4_K":
                out[linear] = f"GGUF Q4_K_M stores it as {kind} (llama.cpp's mix)"
    return out


def _entries(model: nn.Module, weights: Mapping[str, IntWeight], arch: str, fmt: str) -> list[_Entry]:
    config = _text_config(model)
    tensors = _named_tensors(model, arch)
    tied = not any(n == "output.weight" for n, _, _ in tensors)
    kquant = GGUF_TYPES[fmt].spec.kquant
    out = []
    for target, key, t in tensors:
        linear = key.removesuffix(".weight")
        tuned = linear in weights and key.endswith(".weight")
        if kquant and t.dim() == 2 and key.endswith(".weight"):
            kind = q4_k_m_type(target, tuple(t.shape), config.num_hidden_layers, tied)
            if tuned and kind != "Q4_K":
                raise ValueError(f"GGUF Q4_K_M: {linear} has int4 codes but the mix stores it as {kind}")
        elif tuned:
            kind = GGUF_TYPES[fmt].label
        else:
            kind = _dense_type(t, key)
        out.append(_Entry(target, linear if tuned else key, kind, tuple(t.shape), t, tuned))
    factors = llama3_rope_factors(config) if arch == "llama" else None
    if factors is not None:  # not a tensor of the model: made from its config, as llama.cpp's converter does
        out.append(_Entry("rope_freqs.weight", "rope_freqs", "F32", tuple(factors.shape), factors, False))
    return out


def _source_tensor(model: nn.Module, e: _Entry) -> torch.Tensor:
    """The 16-bit tensor of an entry (read from the source's shards when the model is streamed)."""
    t = e.meta
    if t.is_meta:
        lazy = lazy_weights(model)
        if lazy is None:
            raise ValueError(f"{e.source} has no data (a meta tensor of a model that is not streamed)")
        t = lazy.tensor(e.source, t)
    return t.detach().cpu()


def _quantized_bytes(t: torch.Tensor, kind: str) -> np.ndarray:
    """A 16-bit tensor as ``kind`` bytes, quantized here (the mix's types hubtool does not tune)."""
    import gguf

    if kind == "Q4_K":
        from ..kernels import cpu

        iw = quantize_kquant(t, *kquant_fit(t, cpu.fit_scale_min if cpu.runs_on(t.device) else None))
        return q4_k_bytes(iw.q, iw.kquant.d, iw.kquant.dmin, iw.kquant.sc, iw.kquant.m)
    if kind == "Q6_K":
        return quantize_q6_k(t)
    if kind == "Q5_K":
        return quantize_q5_k(t)
    qtype = getattr(gguf.GGMLQuantizationType, kind)  # Q5_0, Q5_1, Q8_0: the gguf package's quantizers
    rows = max(1, (1 << 20) // t.shape[-1])
    return np.concatenate(
        [gguf.quants.quantize(t[r : r + rows].float().numpy(), qtype) for r in range(0, t.shape[0], rows)]
    )


def _tensor_data(model: nn.Module, e: _Entry, weights: Mapping[str, IntWeight], arch: str) -> np.ndarray:
    config = _text_config(model)
    perm = _permutation(arch, config, e.source + (".weight" if e.tuned else ""))
    if e.tuned:
        iw = weights[e.source]
        if tuple(iw.shape) != e.shape:
            raise ValueError(f"{e.source}: IntWeight {tuple(iw.shape)} != weight {e.shape}")
        if perm:
            iw = _permute_intweight(iw, *perm)
        if e.type == "Q4_K":
            kq = iw.kquant
            if kq is None:
                raise ValueError(f"{e.source}: Q4_K needs codes tuned in the Q4_K parameterization")
            return q4_k_bytes(iw.q, kq.d, kq.dmin, kq.sc, kq.m)
        return q4_0_blocks(iw)
    t = _source_tensor(model, e)
    if perm:
        t = _llama_permute(t, *perm)
    if arch == "gemma3" and e.source.endswith("norm.weight"):
        t = t.float() + 1.0  # Gemma3RMSNorm multiplies by (1 + w); llama.cpp stores 1 + w
    if e.type in ("F32", "F16", "BF16"):
        return _dense_bytes(t, e.type)
    return _quantized_bytes(t, e.type)


# -- metadata --------------------------------------------------------------------------------------
def _rope(writer: Any, config: Any) -> None:
    """RoPE base and scaling, as the converter's TextModel writes them."""
    import gguf

    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    full = params.get("full_attention", params)
    theta = full.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    swa = params.get("sliding_attention", {}).get("rope_theta")
    if swa is not None:
        writer.add_rope_freq_base_swa(float(swa))
    kind, factor = full.get("rope_type"), full.get("factor")
    if kind == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    elif kind not in (None, "default", "linear", "llama3"):  # llama3: the rope_freqs tensor says it
        raise HubtoolError(f"GGUF export: RoPE scaling {kind!r} is not written yet", "report this model")


def _rope_params(config: Any) -> dict[str, Any]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    return params.get("full_attention", params)


def llama3_rope_factors(config: Any) -> torch.Tensor | None:
    """Llama 3.1+'s RoPE scaling as llama.cpp stores it (``rope_freqs.weight``: one factor per frequency, by
    which llama.cpp divides it), from the config's ``rope_type: llama3`` parameters; None for other models."""
    p = _rope_params(config)
    if str(p.get("rope_type", "")).lower() != "llama3":
        return None
    base = float(p.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = float(p.get("factor", 8.0))
    low, high = float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0))
    old = float(p.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    out = torch.where(
        wavelen < old / high, torch.ones_like(freqs), torch.where(wavelen > old / low, factor, mid)
    )
    return out.float()


def _write_arch(writer: Any, arch: str, config: Any, name: str, file_type: int) -> None:
    import gguf

    writer.add_name(name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(file_type)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    _rope(writer, config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if arch in ("llama", "gemma3") or getattr(config, "head_dim", None):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim)
    if arch == "gemma3":
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        if getattr(config, "sliding_window_pattern", None) != 1 and getattr(config, "sliding_window", None):
            writer.add_sliding_window(config.sliding_window)
    if arch == "phi3":
        params = dict(getattr(config, "rope_parameters", None) or {})
        if params.get("long_factor"):
            raise HubtoolError(
                "GGUF export: Phi-3 long-context RoPE factors are not written yet", "report this"
            )
        orig = getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(orig)
        rot = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
        writer.add_rope_dimension_count(int(rot * config.hidden_size) // config.num_attention_heads)
        writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)


def _copy_tokenizer(writer: Any, source_gguf: Path) -> None:
    """Every tokenizer.* field of the source GGUF, as it is (vocabulary, merges, special ids, chat template)."""
    import gguf
    from gguf import GGUFReader

    reader = GGUFReader(str(source_gguf))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)


def _gpt2_pre(tokenizer_json: dict, arch: str) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE: GPT-2's regex when the tokenizer uses exactly it."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if arch == "qwen2":
        return "qwen2"
    log.warning(
        "GGUF: unknown pre-tokenizer, writing llama.cpp's 'default' (check tokenization in llama.cpp)"
    )
    return "default"


def _write_bpe_tokenizer(writer: Any, processor: Any, vocab_rows: int, arch: str) -> None:
    """A byte-level BPE tokenizer as the converter's _set_vocab_gpt2 writes it."""
    import gguf

    tok = getattr(processor, "tokenizer", processor)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        chat = getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None)
        path = Path(tmp) / "tokenizer.json"
        if not path.exists():
            raise HubtoolError("GGUF export needs a fast tokenizer (tokenizer.json)", "report this model")
        tj = json.loads(path.read_text())
        if (tj.get("model") or {}).get("type") != "BPE" or (tj.get("model") or {}).get("byte_fallback"):
            raise HubtoolError(
                "GGUF export writes byte-level BPE tokenizers only, for a non-GGUF source",
                "quantize from the model's GGUF, or report this tokenizer",
            )
        vocab = tok.get_vocab()
        reverse = {i: t for t, i in vocab.items()}
        added = tok.get_added_vocab()
        decoder = tok.added_tokens_decoder
        tokens, types = [], []
        for i in range(max(vocab_rows, max(vocab.values()) + 1)):
            if i not in reverse:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
            elif reverse[i] in added:
                tokens.append(reverse[i])
                special = decoder[i].special if i in decoder else True
                types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
            else:
                tokens.append(reverse[i])
                types.append(gguf.TokenType.NORMAL)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_gpt2_pre(tj, arch))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=len(tokens))
        if chat and not special.chat_template:
            special.chat_template = chat
        special.add_to_gguf(writer, quiet=True)


# -- the file --------------------------------------------------------------------------------------
def write_gguf(
    model: nn.Module,
    processor: Any,
    weights: Mapping[str, IntWeight],
    spec: QuantSpec,
    fmt: str,
    out_dir: Path,
    meta: Mapping[str, Any],
    *,
    source_gguf: Path | None = None,
) -> list[GgufTensor]:
    """Write ``out_dir/NAME-TYPE.gguf`` (and ``gguf_tensors.json``: each tensor's type); return the tensors.

    ``out_dir`` must exist (``export_format`` assembles it in a hidden folder).
    """
    import gguf

    gtype = GGUF_TYPES[fmt]
    config = _text_config(model)
    model_type = getattr(config, "model_type", "") or ""
    check_gguf_request(model_type, fmt, spec)
    check_gguf_config(config)
    arch = architecture(model_type)
    entries = _entries(model, weights, arch, fmt)
    missing = sorted(set(weights) - {e.source for e in entries if e.tuned})
    if missing:
        raise ValueError(f"GGUF: quantized linear {missing[0]} has no tensor in the model's state dict")
    name = meta.get("source") or getattr(config, "_name_or_path", "") or "model"
    path = Path(out_dir) / file_name(str(name), fmt)
    writer = gguf.GGUFWriter(str(path), arch)
    _write_arch(writer, arch, config, Path(str(name)).name or "model", gtype.file_type)
    writer.add_quantized_by(f"hubtool {meta.get('hubtool_version', '')}".strip())
    embd = next((e for e in entries if e.name == "token_embd.weight"), None)
    if source_gguf is not None:
        _copy_tokenizer(writer, Path(source_gguf))
    else:
        _write_bpe_tokenizer(writer, processor, embd.shape[0] if embd else config.vocab_size, arch)
    for e in entries:
        raw = getattr(gguf.GGMLQuantizationType, e.type)
        if e.type not in ("BF16", "F16", "F32"):
            block, size = gguf.GGML_QUANT_SIZES[raw]
            byte_shape = (*e.shape[:-1], e.shape[-1] // block * size)
            writer.add_tensor_info(e.name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw)
        elif e.type == "BF16":
            byte_shape = (*e.shape[:-1], e.shape[-1] * 2)
            writer.add_tensor_info(e.name, byte_shape, np.dtype(np.uint8), 2 * math.prod(e.shape), raw)
        else:
            dt = np.dtype(np.float16 if e.type == "F16" else np.float32)
            writer.add_tensor_info(e.name, e.shape, dt, dt.itemsize * math.prod(e.shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for e in entries:
        writer.write_tensor_data(_tensor_data(model, e, weights, arch))
    writer.close()
    tensors = [GgufTensor(e.name, e.source, e.type, e.shape) for e in entries]
    listing = {
        "file": path.name,
        "type": gtype.label,
        "architecture": arch,
        "tensors": [{"name": e.name, "source": e.source, "type": e.type, "tuned": e.tuned} for e in entries],
    }
    (Path(out_dir) / "gguf_tensors.json").write_text(json.dumps(listing, indent=1) + "\n")
    log.info("wrote %s (%d tensors, %d from tuned codes)", path.name, len(tensors), len(weights))
    return tensors
