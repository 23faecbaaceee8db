"""16-bit linears at small M through hubtool's CPU dense kernel (``hubtool::dense_mm_cpu``), torch otherwise.

An int4 model keeps some linears in 16 bits, the lm_head above all: on Gemma 3 270M (a 262144 x 640 head)
it is most of a decode step, and torch's bf16 matmul reads it at about a third of the memory bandwidth.
``use_dense_kernel(model)`` turns every plain ``nn.Linear`` of a model into a :class:`DenseLinear` by
changing its class, nothing else: the parameters stay the same objects (a head tied to the embedding
stays tied, and the weight is read where it lies, never copied), the state dict, ``save_pretrained``,
``.to()`` and ``torch.compile`` see an ``nn.Linear``. ``DenseLinear.forward`` calls the kernel when

* the weight is bf16 or fp16 on the CPU with contiguous rows, and x has the weight's dtype (other
  dtype pairs keep torch's behaviour, errors included);
* x has at most ``MAX_M`` rows (a decode step; a prefill goes to torch, faster there);
* no gradient is wanted (the op has no backward) and the kernel library is built;
* the policy allows it: ``HUBTOOL_DENSE_KERNEL=auto|hubtool|torch``, else ``HUBTOOL_KERNEL`` (whose
  ``reference`` and ``torch`` mean torch here too, so that they stay the all-torch baselines), else
  auto; a layer's own ``dense_backend`` (a loader's ``backend=``) comes first.

Everything else, CUDA included, runs ``F.linear`` as before. ``last_backend`` says which ran last.
``hf_quantizer`` applies this to every model it loads (``hubtool.load`` and transformers alike).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu
from .backends import ENV_VAR as INT4_ENV_VAR

log = logging.getLogger(__name__)

ENV_VAR = "HUBTOOL_DENSE_KERNEL"
# Rows of x up to which the kernel runs. It streams the weight once for all rows; its multiply work grows
# with M and reaches torch's matmul at M = 5..6 (a weight in L2, one thread: 50 vs 87 us at M = 4, 80 vs
# 88 us at M = 6, 98 vs 92 us at M = 8, 1024 x 640 bf16; ``bench_kernels.run_head`` times the heads).
MAX_M = 4
_KERNEL_NAMES = ("auto", "hubtool")


def policy(backend: str | None = None) -> str:
    """The dense policy in force: ``backend``, else $HUBTOOL_DENSE_KERNEL, else $HUBTOOL_KERNEL, else auto."""
    return backend or os.environ.get(ENV_VAR) or os.environ.get(INT4_ENV_VAR) or "auto"


def kernel_serves(weight: torch.Tensor, x: torch.Tensor, backend: str | None = None) -> bool:
    """Whether ``F.linear(x, weight)`` may run on hubtool's dense kernel (see the module's conditions)."""
    if x.dtype != weight.dtype or weight.dtype not in cpu.DENSE_WEIGHT_DTYPES:
        return False
    return small_m_serves(weight, x, backend)


def small_m_serves(weight: torch.Tensor, x: torch.Tensor, backend: str | None = None) -> bool:
    """What every small-M CPU kernel that streams a weight read in place asks (dtypes aside): both on the
    CPU, rows of the weight contiguous, at most ``MAX_M`` rows of x, no gradient, the policy and the
    library allowing it."""
    if x.device.type != "cpu" or weight.device.type != "cpu" or weight.dim() != 2 or x.dim() == 0:
        return False
    k = weight.shape[1]
    if x.shape[-1] != k or weight.stride(1) != 1 or weight.stride(0) < k:
        return False
    if x.numel() > MAX_M * k or x.numel() == 0:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    return policy(backend) in _KERNEL_NAMES and cpu.runs_on(x.device)


class DenseLinear(nn.Linear):
    """An ``nn.Linear`` whose forward runs hubtool's CPU dense kernel at small M, torch otherwise."""

    last_backend: str | None = None  # "hubtool" or "torch": what the last forward ran
    dense_backend: str | None = None  # pins the policy for this layer (None: the environment's)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x W^T + b: hubtool's kernel where ``kernel_serves``, else ``F.linear``."""
        if kernel_serves(self.weight, x, self.dense_backend):
            self.last_backend = "hubtool"
            y = cpu.dense_mm(x.reshape(-1, self.in_features), self.weight, self.bias)
            return y.reshape(*x.shape[:-1], self.out_features)
        self.last_backend = "torch"
        return F.linear(x, self.weight, self.bias)


def use_dense_kernel(model: nn.Module, backend: str | None = None) -> int:
    """Turn every plain ``nn.Linear`` of ``model`` into a DenseLinear in place (its class only); returns how many.

    ``backend`` pins the policy of these layers (``hubtool``, ``torch``/``reference``: torch; None: the
    environment's, read at each call).
    """
    done = 0
    for module in model.modules():
        if type(module) is nn.Linear or type(module) is DenseLinear:
            module.__class__ = DenseLinear
            if backend is not None:
                module.dense_backend = backend
            done += 1
    log.debug("%d 16-bit linears run through hubtool's dense kernel at small M", done)
    return done


def restore_linears(model: nn.Module) -> int:
    """Undo :func:`use_dense_kernel`: every DenseLinear is a plain ``nn.Linear`` again; returns how many."""
    done = 0
    for module in model.modules():
        if type(module) is DenseLinear:
            module.__class__ = nn.Linear
            for attr in ("last_backend", "dense_backend"):
                module.__dict__.pop(attr, None)
            done += 1
    return done


def dense_backends(model: nn.Module) -> dict[str, str | None]:
    """``last_backend`` of every DenseLinear of ``model``, by module name."""
    return {name: m.last_backend for name, m in model.named_modules() if isinstance(m, DenseLinear)}
