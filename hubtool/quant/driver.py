"""The quantizer's entry point: :func:`quantize_model` runs the chosen method over a plan's linears.

``rtn`` rounds each weight alone (no data). ``opt-rtn`` and ``signround`` run block by block on the
calibration data: :class:`.runner.BlockRunner` (capture, placement, memory, resume, progress) calls
:func:`.blockquant.quantize_block` (the per-block algorithm) on each block. The model's own weights
are left untouched.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

from torch import nn

from ..core.intweight import IntWeight
from ..core.lazy import held
from ..core.memory import pin_mmap_threshold
from ..core.spec import QuantSpec
from ..errors import HubtoolError
from ..record import BlockLoss
from .blockquant import quantize_block
from .layers import QuantPlan
from .result import ProgressEvent, ProgressFn, QuantResult
from .rtn import quantize_rtn
from .runner import BlockRunner
from .spec import Recipe, check_method
from .workdir import WorkDir, fingerprint

__all__ = ["ProgressEvent", "ProgressFn", "QuantResult", "quantize_model"]


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
    spreads each block over several devices while it is tuned; ``work_dir`` keeps finished blocks, which
    ``resume`` continues from.
    """
    pin_mmap_threshold()  # block after block of large temporaries: keep the heap from fragmenting
    if check_method(method) == "rtn":
        work = None
        if work_dir:
            work = WorkDir(Path(work_dir), spec, fingerprint(model, plan, spec, method, None, None))
        return _rtn(model, plan, spec, progress, work, resume)
    if calib is None or len(calib) == 0:
        raise HubtoolError(f"--method {method} needs calibration data", "pass --calib or use --method rtn")
    recipe = recipe or Recipe()
    runner = BlockRunner(
        model,
        plan,
        calib,
        batch_size=max(1, min(recipe.batch_size, len(calib))),
        device=device,
        device_map=device_map,
        progress=progress,
    )
    work = None
    if work_dir:
        work = WorkDir(Path(work_dir), spec, fingerprint(model, plan, spec, method, recipe, calib))
    per_block = functools.partial(quantize_block, spec=spec, method=method, recipe=recipe)
    return runner.run(per_block, work, resume)


def _rtn(
    model: nn.Module,
    plan: QuantPlan,
    spec: QuantSpec,
    progress: ProgressFn | None,
    work: WorkDir | None = None,
    resume: bool = False,
) -> QuantResult:
    """Round each planned linear alone, block by block (a streamed model reads one block at a time);
    with ``work`` the codes go to the work directory instead of memory."""
    weights: dict[str, IntWeight] = {}
    done = work.start(resume) if work else 0
    for i, block in enumerate(plan.blocks):
        if i >= done:
            with held(model, model.get_submodule(block.name)):
                codes = {
                    n: quantize_rtn(model.get_submodule(n).weight.detach(), spec) for n in block.full_names()
                }
            if work:
                work.save_block(i, BlockLoss(block.name, math.nan, math.nan), codes)
                work.commit(i + 1)
            else:
                weights.update(codes)
            del codes
        if progress:
            progress(ProgressEvent(i, len(plan.blocks), block.name, done=True))
    return QuantResult(weights=work.codes() if work else weights)
