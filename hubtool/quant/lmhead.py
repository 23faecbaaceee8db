"""Quantize a model's lm_head for the ``hubtool`` format (``--quantize-lm-head``; the math is ``core.lmhead``).

The head is quantized round-to-nearest, whatever the method of the blocks: int8 per output row, int4 with
the spec's group size and full-range symmetric scale (``quant.rtn``). Its 16-bit rows are read in blocks
(from the source's shards for a streamed model), so a 128k x 4096 head never sits in memory as float32.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..core import packing
from ..core.intweight import CHUNK_ELEMENTS, IntWeight
from ..core.lazy import lazy_weights
from ..core.lmhead import HEAD_MODES, HeadWeights, head_name, int8_rows
from ..core.spec import QuantSpec
from ..errors import HubtoolError
from .rtn import quantize_rtn

ROW_BLOCK_BYTES = 64 << 20  # 16-bit rows of the head read (and quantized) at a time


def check_head(model: nn.Module, mode: str | None, spec: QuantSpec) -> str | None:
    """The head's module name when ``mode`` asks to quantize it; one-line errors for what cannot be."""
    if mode is None:
        return None
    if mode not in HEAD_MODES:
        raise HubtoolError(f"--quantize-lm-head {mode!r} is not a mode", "use int8 or int4")
    name = head_name(model)
    if name is None or not isinstance(model.get_submodule(name), nn.Linear):
        raise HubtoolError(
            f"{type(model).__name__} has no linear output head to quantize", "drop --quantize-lm-head"
        )
    k = model.get_submodule(name).in_features
    if mode == "int4" and k % spec.group_size:
        raise HubtoolError(
            f"--quantize-lm-head int4: the head's {k} inputs are not a multiple of --group-size {spec.group_size}",
            "use --quantize-lm-head int8, or a group size that divides it",
        )
    return name


def head_rows(model: nn.Module, name: str) -> Iterator[torch.Tensor]:
    """The 16-bit weight of head ``name`` in blocks of rows (read from the checkpoint when streamed)."""
    weight = model.get_submodule(name).weight
    lazy = lazy_weights(model)
    if weight.device.type != "meta" or lazy is None:
        step = max(1, CHUNK_ELEMENTS // weight.shape[1])
        for start in range(0, weight.shape[0], step):
            yield weight[start : start + step].detach().to("cpu")
        return
    # a head tied to the embedding is stored under the embedding's name
    stored = [n for n, p in model.named_parameters(remove_duplicate=False) if p is weight and n in lazy.names]
    if not stored:
        raise HubtoolError(f"the checkpoint has no weight for {name}")
    yield from lazy.tensor_chunks(stored[0], weight, ROW_BLOCK_BYTES)


def quantize_head(model: nn.Module, name: str, mode: str, spec: QuantSpec) -> HeadWeights:
    """The head ``name`` of ``model`` quantized as ``mode`` (int8 or int4), as the tensors an export writes."""
    if mode == "int8":
        parts = [int8_rows(rows) for rows in head_rows(model, name)]
        tensors = {
            f"{name}.qweight": torch.cat([q for q, _ in parts]),
            f"{name}.scales": torch.cat([s for _, s in parts]),
        }
    else:
        parts = [quantize_rtn(rows, spec) for rows in head_rows(model, name)]
        iw = IntWeight(
            torch.cat([p.q for p in parts]),
            torch.cat([p.scale for p in parts]),
            torch.cat([p.zero for p in parts]),
            spec.group_size,
            spec.bits,
        )
        tensors = packing.pack(iw).as_dict(name, with_g_idx=False)
    return HeadWeights(name, mode, {k: v.contiguous() for k, v in tensors.items()}, f"{name}.weight")
