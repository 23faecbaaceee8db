"""The storage spec of quantized weights: bits, group size, symmetric or not."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import HubtoolError

SUPPORTED_BITS = (4,)
SUPPORTED_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantSpec:
    """The storage format of the quantized weights: bits, group size, symmetric or not.

    ``kquant``: llama.cpp's Q4_K parameterization (asymmetric groups of 32 whose scales and minimums are
    6-bit codes on a per-256 fp16 step, :mod:`.kquant`), which only GGUF stores.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    kquant: bool = False

    def __post_init__(self) -> None:
        if self.kquant and (self.bits, self.group_size, self.sym) != (4, 32, False):
            raise HubtoolError(
                "the Q4_K parameterization is 4-bit, asymmetric, in groups of 32",
                "use QuantSpec(4, 32, False, kquant=True)",
            )
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
