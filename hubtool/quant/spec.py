"""How to quantize: the methods and the SignRound recipes (the storage spec is ``core.spec.QuantSpec``)."""

from __future__ import annotations

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


def make_recipe(name: str = "default", **overrides) -> Recipe:
    """Return the named recipe with the given fields (those not None) replaced."""
    if name not in RECIPES:
        raise HubtoolError(f"unknown recipe {name!r}", "use one of " + ", ".join(RECIPES))
    changes = {k: v for k, v in overrides.items() if v is not None}
    for key in ("iters", "nsamples", "seqlen", "batch_size"):
        if key in changes and changes[key] < (0 if key == "iters" else 1):
            raise HubtoolError(f"--{key.replace('_', '-')} must be positive, got {changes[key]}")
    return replace(RECIPES[name], **changes)


def check_method(method: str) -> str:
    """Validate a --method value."""
    if method not in METHODS:
        raise HubtoolError(f"unknown method {method!r}", "use one of " + ", ".join(METHODS))
    return method
