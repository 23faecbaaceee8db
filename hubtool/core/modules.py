"""Which module functions hubtool's fused CPU ops compute, recognized by the lines of their source.

An op replaces a module's forward only where that forward is the known one (transformers' code, compared
without whitespace): quantization's block tuning (``quant.fused``) and eager inference
(``runtime.fused_norms``) both ask here.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

# RMSNorm variants by the lines of their forward (whitespace ignored): mode 0 multiplies the fp32
# normalized value by (1 + w) and rounds once (Gemma); mode 1 rounds it, then times w (Llama, Qwen, Phi-3)
NORM_LINES = {
    0: (
        "output = self._norm(x.float())",
        "output = output * (1.0 + self.weight.float())",
        "return output.type_as(x)",
        "return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)",
    ),
    1: (
        "hidden_states = hidden_states.to(torch.float32)",
        "variance = hidden_states.pow(2).mean(-1, keepdim=True)",
        "hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)",
        "return self.weight * hidden_states.to(input_dtype)",
    ),
}
NORM_EPS = {0: "eps", 1: "variance_epsilon"}


def source_text(*fns) -> str:
    """The functions' source without whitespace; '' when any is unavailable."""
    parts = []
    for fn in fns:
        try:
            parts.append(inspect.getsource(fn))
        except (OSError, TypeError):
            return ""
    return "".join("".join(parts).split())


def module_source(module: nn.Module) -> str:
    """The source of a module class's forward (and ``_norm``), without whitespace."""
    cls = type(module)
    return source_text(*(getattr(cls, n) for n in ("forward", "_norm") if hasattr(cls, n)))


def has_lines(src: str, lines: tuple[str, ...]) -> bool:
    """Whether every line (whitespace ignored) is in ``src``."""
    return bool(src) and all("".join(line.split()) in src for line in lines)


def norm_mode(module: nn.Module) -> int | None:
    """0 (Gemma) or 1 (Llama) for an RMSNorm the fused op computes; None for any other module."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1:
        return None
    src = module_source(module)
    for mode, lines in NORM_LINES.items():
        if isinstance(getattr(module, NORM_EPS[mode], None), float) and has_lines(src, lines):
            return mode
    return None
