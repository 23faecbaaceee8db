"""What to quantize and how: the int4 spec and the tuning recipes."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import HubtoolError

SUPPORTED_BITS = (4,)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
METHODS = ("rtn", "opt-rtn", "signround")


@dataclass(frozen=True)
class QuantSpec:
    """The storage format of the quantized weights: bits, group size, symmetric or not."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise HubtoolError(f"--bits {self.bits} is not supported", "hubtool writes int4: use --bits 4")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise HubtoolError(
                f"--group-size {self.group_size} is not supported",
                "use one of " + ", ".join(map(str, SUPPORTED_GROUP_SIZES)),
            )

    @property
    def qmax(self) -> int:
        """Largest unsigned code (15 for int4)."""
        return (1 << self.bits) - 1

    @property
    def sym_zero(self) -> int:
        """The zero point of symmetric quantization (8 for int4)."""
        return 1 << (self.bits - 1)

    @property
    def code_range(self) -> tuple[int, int]:
        """(lo, hi) of the codes as tuned: signed, -8..7, for symmetric; unsigned, 0..15, with a zero point."""
        return (-self.sym_zero, self.sym_zero - 1) if self.sym else (0, self.qmax)


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
