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
# transformers' rotary embedding (Llama, Gemma, Qwen2, Phi-3...), a module-level function and its helper
ROPE_LINES = (
    "cos = cos.unsqueeze(unsqueeze_dim)",
    "sin = sin.unsqueeze(unsqueeze_dim)",
    "q_embed = (q * cos) + (rotate_half(q) * sin)",
    "k_embed = (k * cos) + (rotate_half(k) * sin)",
    "return q_embed, k_embed",
)
ROTATE_HALF_LINES = (
    "x1 = x[..., : x.shape[-1] // 2]",
    "x2 = x[..., x.shape[-1] // 2 :]",
    "return torch.cat((-x2, x1), dim=-1)",
)


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


def plain_function(fn):
    """The Python function behind ``fn``: ``fn`` itself, the one hubtool's wrapper (``_hubtool_original``)
    or transformers' kernel-hub wrapper (with the ``kernels`` package installed, a module whose forward calls
    the function it closes over as ``func``) holds; None when there is none."""
    fn = getattr(fn, "_hubtool_original", fn)
    if isinstance(fn, nn.Module):
        try:
            fn = inspect.getclosurevars(type(fn).forward).nonlocals.get("func")
        except (TypeError, ValueError):
            return None
    return fn if inspect.isfunction(fn) else None


def rope_applies(fn, module_globals: dict) -> bool:
    """Whether ``fn`` (a modeling module's ``apply_rotary_pos_emb``, or a wrapper of it) and that module's
    ``rotate_half`` are the known rotary embedding, which ``hubtool::rope`` computes."""
    fn = plain_function(fn)
    rotate = module_globals.get("rotate_half")
    return (
        rotate is not None
        and has_lines(source_text(fn), ROPE_LINES)
        and has_lines(source_text(rotate), ROTATE_HALF_LINES)
    )


def rope_call_fits(q, k, cos, sin, args: tuple, kwargs: dict) -> bool:
    """Whether a call ``apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs)`` has the layout the op takes:
    q, k (B, H, L, D) and cos, sin (B|1, L, D) in one dtype, unsqueezed at 1, rows contiguous."""
    unsqueeze = args[0] if args else kwargs.get("unsqueeze_dim", 1)
    return not (
        unsqueeze != 1
        or len(args) > 1
        or set(kwargs) - {"unsqueeze_dim"}
        or not (q.dtype == k.dtype == cos.dtype == sin.dtype and q.dim() == k.dim() == 4)
        or cos.dim() != 3
        or cos.shape != sin.shape
        or cos.shape[-1] != q.shape[-1]
        or q.shape[-1] != k.shape[-1]
        or q.shape[-1] % 2
        or cos.shape[0] not in (1, q.shape[0])
        or cos.shape[1] != q.shape[2]
        or k.shape[2] != q.shape[2]
        or any(t.stride(-1) != 1 for t in (q, k))
    )
