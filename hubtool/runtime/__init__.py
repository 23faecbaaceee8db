"""Inference: the Int4Linear layer and the kernels behind it."""

from .backends import available_backends, select_backend
from .int4linear import Int4Linear, replace_linears

__all__ = ["Int4Linear", "replace_linears", "available_backends", "select_backend"]
