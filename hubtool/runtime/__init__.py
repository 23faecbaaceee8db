"""Running int4 (floor 3, no quantizer needed): the Int4Linear layer (``int4linear``), the kernel backends
and auto's choice among them (``backends``), 16-bit linears on hubtool's small-M dense kernel (``dense``), and loading int4 checkpoints of any tool (``loader``, through
the HfQuantizer of ``hf_quantizer``)."""

from .backends import available_backends, select_backend
from .dense import DenseLinear, use_dense_kernel
from .int4linear import Int4Linear, replace_linears

__all__ = [
    "Int4Linear",
    "replace_linears",
    "available_backends",
    "select_backend",
    "DenseLinear",
    "use_dense_kernel",
]
