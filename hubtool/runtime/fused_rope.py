"""Rotary position embeddings of a loaded model as one C++ pass per tensor on the CPU, for eager decoding.

transformers' ``apply_rotary_pos_emb`` (Llama, Gemma, Qwen2, Phi-3...) is about fifteen small torch ops for
the queries and keys of a layer (unsqueezes, products, the half rotation's slices, negation and
concatenation, sums); at a decode step of a small model that is per-op overhead. ``use_fused_rope`` replaces
the function in the modeling module of the model's layers, where its source and ``rotate_half``'s are the
known ones (:func:`hubtool.core.modules.rope_applies`), by one that calls ``hubtool::rope`` on each tensor
(the op block tuning uses; each product and the sum rounded as torch's ops round them, so the result is
bit-identical) when

* no gradient is wanted, the tensors are on the CPU in one dtype with the layout the op takes
  (:func:`hubtool.core.modules.rope_call_fits`), and the kernel library is built;
* torch.compile is not tracing (a compiled model fuses them itself);
* ``HUBTOOL_FUSED_ROPE`` is not ``0``.

Otherwise the original function runs. The function is a module global, so the replacement serves every
model of that architecture in the process, with the same results. ``hf_quantizer`` applies this to the
models it loads.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

from ..core.modules import rope_applies, rope_call_fits
from ..kernels import cpu

ENV_VAR = "HUBTOOL_FUSED_ROPE"  # "0": transformers' own function
NAME = "apply_rotary_pos_emb"


def _fused(original):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if (
            torch.compiler.is_compiling()
            or torch.is_grad_enabled()
            or q.device.type != "cpu"
            or os.environ.get(ENV_VAR) == "0"
            or not rope_call_fits(q, k, cos, sin, args, kwargs)
            or not cpu.runs_on(q.device)
        ):
            return original(q, k, cos, sin, *args, **kwargs)
        cos, sin = cos.contiguous(), sin.contiguous()
        return cpu.rope(q, cos, sin), cpu.rope(k, cos, sin)

    apply_rotary_pos_emb._hubtool_original = original  # type: ignore[attr-defined]
    apply_rotary_pos_emb.__doc__ = original.__doc__
    return apply_rotary_pos_emb


def use_fused_rope(model: nn.Module) -> int:
    """Replace ``apply_rotary_pos_emb`` in the modeling modules of ``model``'s layers (where it is the known
    function) by the fused one; returns how many modules changed now (0 when already done or off)."""
    if os.environ.get(ENV_VAR) == "0" or not cpu.load():
        return 0
    done = 0
    for module in {sys.modules.get(type(m).__module__) for m in model.modules()}:
        g = getattr(module, "__dict__", {})
        fn = g.get(NAME)
        if fn is None or hasattr(fn, "_hubtool_original") or not rope_applies(fn, g):
            continue
        g[NAME] = _fused(fn)
        done += 1
    return done


def restore_rope() -> int:
    """Undo :func:`use_fused_rope` in every modeling module; returns how many."""
    done = 0
    for module in list(sys.modules.values()):
        g = getattr(module, "__dict__", None)
        fn = g.get(NAME) if isinstance(g, dict) else None
        if fn is not None and hasattr(fn, "_hubtool_original"):
            g[NAME] = fn._hubtool_original
            done += 1
    return done
