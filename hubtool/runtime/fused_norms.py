"""RMSNorms of a loaded model as one C++ pass each on the CPU, for eager decoding.

A decode step of a small model is mostly per-op overhead: transformers' RMSNorm is five to seven torch ops
(fp32 cast, square, mean, rsqrt, products, casts), and Gemma 3 runs six norms per layer. ``use_fused_norms``
gives each RMSNorm whose forward is the known one (:func:`hubtool.core.modules.norm_mode`: Gemma's
``x * r * (1 + w)`` and Llama's ``w * (x * r)``) a forward that runs ``hubtool::rms_norm_fwd`` (the kernel
block tuning uses; the same roundings as the module's code) when

* no gradient is wanted, x is contiguous on the CPU in the module's 16-bit dtype (or fp32 with an fp32 weight),
  and the kernel library is built;
* torch.compile is not tracing (a compiled model fuses the norm itself);
* ``HUBTOOL_FUSED_NORMS`` is not ``0``.

Otherwise the module's own forward runs. ``hf_quantizer`` applies this to the models it loads on the CPU.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..core.modules import NORM_EPS, norm_mode
from ..kernels import cpu

ENV_VAR = "HUBTOOL_FUSED_NORMS"  # "0": the modules' own forwards


_CLASSES: dict[tuple[type, int], type] = {}


def _fused_class(cls: type, mode: int) -> type:
    """``cls`` with the fused forward (one subclass per norm class and mode, made once)."""
    key = (cls, mode)
    if key not in _CLASSES:
        eps_attr = NORM_EPS[mode]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.weight
            if (
                torch.compiler.is_compiling()
                or torch.is_grad_enabled()
                or x.device.type != "cpu"
                or not x.is_contiguous()
                or x.dtype not in (torch.bfloat16, torch.float16, torch.float32)
                or (mode == 1 and w.dtype != x.dtype)  # an fp32 weight on 16-bit x promotes: not the op's
                or os.environ.get(ENV_VAR) == "0"
            ):
                return cls.forward(self, x)
            key = (w.data_ptr(), w._version, w.dtype)
            cached = self.__dict__.get("_fused_weight")
            if cached is None or cached[0] != key:  # the fp32 weight the op reads, once per weight version
                fp32 = (1.0 + w.detach().float()) if mode == 0 else w.detach().float()
                cached = self.__dict__["_fused_weight"] = (key, fp32.contiguous())
            # the op itself, no autograd node (x is contiguous: the not-contiguous case went to the module)
            return torch.ops.hubtool.rms_norm_fwd(x, cached[1], float(getattr(self, eps_attr)), mode)[0]

        _CLASSES[key] = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
    return _CLASSES[key]


def use_fused_norms(model: nn.Module) -> int:
    """Give every known RMSNorm of ``model`` the fused forward (its class becomes a subclass that adds it:
    parameters, state dict, deepcopy and ``.to()`` are the module's own); returns how many."""
    if os.environ.get(ENV_VAR) == "0" or not cpu.load():
        return 0
    n = 0
    for module in model.modules():
        if "forward" in module.__dict__ or type(module) in _CLASSES.values():
            continue
        mode = norm_mode(module)
        if mode is not None:
            module.__class__ = _fused_class(type(module), mode)
            n += 1
    return n
