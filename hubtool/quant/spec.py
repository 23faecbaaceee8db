"""How to quantize: the methods and the SignRound recipes (the storage spec is ``core.spec.QuantSpec``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..errors import HubtoolError

METHODS = ("rtn", "opt-rtn", "signround")


@dataclass(frozen=True)
class Recipe:
    """How SignRound tunes: iterations, calibration size and the optimizer settings."""

    name: str = "default"
    iters: int = 200
    nsamples: int = 128
    seqlen: int = 2048
    batch_size: int = 8
    lr: float | None = None  # None: 1/iters, as in the paper
    seed: int = 42

    @property
    def learning_rate(self) -> float:
        """The SignSGD step size actually used."""
        return self.lr if self.lr is not None else 1.0 / max(self.iters, 1)


RECIPES: dict[str, Recipe] = {
    "best": Recipe("best", iters=1000, nsamples=512, seqlen=2048, batch_size=8),
    "default": Recipe("default", iters=200, nsamples=128, seqlen=2048, batch_size=8),
    "light": Recipe("light", iters=50, nsamples=128, seqlen=2048, batch_size=8, lr=5e-3),
}


# The smallest value of each integer setting (seqlen: a token and the next one it predicts).
MINIMUM = {"iters": 0, "nsamples": 1, "seqlen": 2, "batch_size": 1, "seed": 0}
MAX_SEED = 2**32 - 1  # what every random generator hubtool seeds accepts


def make_recipe(name: str = "default", **overrides) -> Recipe:
    """Return the named recipe with the given fields (those not None) replaced, each range-checked.

    ``batch_size`` larger than ``nsamples`` is refused when both are given; when only ``nsamples`` is, tuning
    uses batches of all the samples there are (the runner clamps the batch to the calibration set).
    """
    if name not in RECIPES:
        raise HubtoolError(f"unknown recipe {name!r}", "use one of " + ", ".join(RECIPES))
    changes = {k: v for k, v in overrides.items() if v is not None}
    for key, value in changes.items():
        flag = "--" + key.replace("_", "-")
        if key == "lr":
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise HubtoolError(
                    f"{flag} must be a finite number > 0, got {value!r}", "omit --lr to use 1/iters"
                )
        elif key in MINIMUM:
            top = MAX_SEED if key == "seed" else None
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < MINIMUM[key]
                or (top and value > top)
            ):
                allowed = f"from {MINIMUM[key]} to {top}" if top else f">= {MINIMUM[key]}"
                raise HubtoolError(f"{flag} must be an integer {allowed}, got {value!r}")
    if "batch_size" in changes and "nsamples" in changes and changes["batch_size"] > changes["nsamples"]:
        raise HubtoolError(
            f"--batch-size {changes['batch_size']} is larger than --nsamples {changes['nsamples']}",
            f"use --batch-size {changes['nsamples']} or less, or more samples",
        )
    return replace(RECIPES[name], **changes)


def check_method(method: str) -> str:
    """Validate a --method value."""
    if method not in METHODS:
        raise HubtoolError(f"unknown method {method!r}", "use one of " + ", ".join(METHODS))
    return method
