"""The lm_head quantized for the ``hubtool`` format (``--quantize-lm-head int8|int4``): where it is, its
int8 math, and the tensors an export writes for it.

The head of a small model is most of a decode step's bytes (Gemma 3 270M: a 262144 x 640 bf16 head,
335 MB, against 100 MB for all the int4 blocks together). ``int8`` stores it per output row, symmetric:
``scale = absmax / 127``, codes ``round(w / scale)`` in -127..127 (half the bytes, ~0.4% of a row's range
per weight at most). ``int4`` stores it as one more GPTQ int4 linear of the spec's group size (a quarter of
the bytes). A head tied to the embedding is untied: the embedding stays 16-bit, the head is stored
quantized under its own name, and config.json says ``tie_word_embeddings: false``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

HEAD_MODES = ("int8", "int4")
HEAD_FORMAT = "hubtool"  # the one format whose runtime is proven to load a quantized lm_head
HEAD16_SUFFIX = ", 16-bit head"  # eval's label of a variant with its 16-bit head put back
INT8_MAX = 127


@dataclass
class HeadWeights:
    """A quantized lm_head as an export writes it: the module's name, its mode and its tensors by key."""

    name: str  # the head module's name in the model (e.g. "lm_head")
    mode: str  # "int8" or "int4"
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # full checkpoint keys -> tensors
    weight_key: str = ""  # the 16-bit weight it replaces ("lm_head.weight")


def head_name(model: nn.Module) -> str | None:
    """The module name of ``model``'s output head (``get_output_embeddings``), None when it has none."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of w (N, K): codes int8 (N, K) and the float32 scale per row (N,)."""
    wf = w.float()
    scale = (wf.abs().amax(dim=1) / INT8_MAX).clamp(min=1e-12)
    q = torch.round(wf / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def int8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight int8 codes (N, K) with row scales (N,) stand for, in ``dtype``."""
    return (q.float() * scale.float()[:, None]).to(dtype)
