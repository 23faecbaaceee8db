"""What a quantization run reports: :class:`ProgressEvent` while it runs, :class:`QuantResult` at the end."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..core.intweight import IntWeight
from ..record import BlockLoss, SkippedLayer


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
