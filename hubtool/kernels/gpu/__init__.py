"""hubtool's GPU int4 kernels (Triton); importable without triton or CUDA."""

from .triton_int4 import HAVE_TRITON, TritonPacked, available, choose_path, int4_mm, interpreting, prepare

__all__ = ["HAVE_TRITON", "TritonPacked", "available", "choose_path", "int4_mm", "interpreting", "prepare"]
