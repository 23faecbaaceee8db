"""Quantize a model's planned linears with the chosen method; the model's own weights are left untouched."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..core.intweight import IntWeight
from ..core.spec import QuantSpec
from ..record import BlockLoss, SkippedLayer
from .layers import QuantPlan
from .rtn import quantize_rtn
from .spec import Recipe

log = logging.getLogger(__name__)


@dataclass
class ProgressEvent:
    """Reported after each block (and, while tuning, every few iterations)."""

    index: int  # block index, 0-based
    total: int
    block: str
    done: bool = False  # True once the block is finished
    iteration: int = 0
    iters: int = 0
    rtn_loss: float | None = None
    loss: float | None = None


ProgressFn = Callable[[ProgressEvent], None]


@dataclass
class QuantResult:
    """What the quantizer produced: codes per linear (full module name), per-block losses, extra skips."""

    weights: dict[str, IntWeight]
    block_losses: list[BlockLoss] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    weight_grad: str | None = None  # SignRound: the precision of dL/dW ("int8" on the CPU, else the dtype)


def quantize_model(
    model: nn.Module,
    plan: QuantPlan,
    spec: QuantSpec,
    method: str,
    recipe: Recipe | None = None,
    calib: Any = None,
    *,
    device: str = "cpu",
    work_dir: Path | None = None,
    resume: bool = False,
    progress: ProgressFn | None = None,
    device_map: str | None = None,
) -> QuantResult:
    """Quantize every linear in ``plan``: RTN needs no data; opt-rtn and signround run block by block.

    ``calib`` is a :class:`hubtool.quant.calib.CalibrationSet`; ``device_map`` ("cuda:0,cuda:1" or "auto")
    spreads each block over several GPUs while it is tuned.
    """
    if method == "rtn":
        return _rtn(model, plan, spec, progress)
    from .blockwise import quantize_blockwise

    return quantize_blockwise(
        model,
        plan,
        spec,
        method,
        recipe,
        calib,
        device=device,
        work_dir=work_dir,
        resume=resume,
        progress=progress,
        device_map=device_map,
    )


def _rtn(model: nn.Module, plan: QuantPlan, spec: QuantSpec, progress: ProgressFn | None) -> QuantResult:
    weights: dict[str, IntWeight] = {}
    for i, block in enumerate(plan.blocks):
        for name in block.full_names():
            weights[name] = quantize_rtn(model.get_submodule(name).weight.detach(), spec)
        if progress:
            progress(ProgressEvent(i, len(plan.blocks), block.name, done=True))
    return QuantResult(weights=weights)
