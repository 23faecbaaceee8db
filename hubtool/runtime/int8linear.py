"""Int8Linear: a linear layer stored as int8 codes with one float32 scale per output row (an int8 lm_head).

The weight is ``qweight`` int8 (N, K), symmetric, times ``scales`` float32 (N,) (``core.lmhead``). On the
CPU at small M (a decode step) and without gradients it runs hubtool's int8 kernel
(``hubtool::int8_mm_cpu``: the codes read where they lie, once per call, fp32 accumulation); everywhere
else (a prefill, CUDA, the kernel not built, ``HUBTOOL_DENSE_KERNEL=torch``) it multiplies by the codes
converted to x's dtype, a block of rows at a time, and scales the result in float32: int8 codes are exact
in bf16 and fp16, so this is the same product up to one more rounding of the output. ``last_backend`` says which ran.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.lmhead import int8_dequantize
from ..kernels import cpu
from .dense import small_m_serves

ROWS_PER_STEP = 16384  # rows of the weight converted at a time by the torch path (bounded temporaries)


class Int8Linear(nn.Module):
    """A drop-in ``nn.Linear`` with int8 weights, symmetric per output row (qweight int8, scales float32)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        backend: str | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self.last_backend: str | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (N, K) weight."""
        return int8_dequantize(self.qweight, self.scales, dtype)

    def kernel_serves(self, x: torch.Tensor) -> bool:
        """Whether this call may run on hubtool's CPU int8 kernel."""
        return x.dtype in cpu.INT8_X_DTYPES and small_m_serves(self.qweight, x, self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x (q * scale)^T + b: hubtool's kernel where it serves, else torch in blocks of rows."""
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.kernel_serves(x2):
            self.last_backend = "hubtool"
            y = cpu.int8_mm(x2.contiguous(), self.qweight, self.scales, self.bias)
        else:
            self.last_backend = "torch"
            y = x2.new_empty(x2.shape[0], self.out_features)
            for r in range(0, self.out_features, ROWS_PER_STEP):
                part = F.linear(x2, self.qweight[r : r + ROWS_PER_STEP].to(x.dtype)).float()
                part *= self.scales[r : r + ROWS_PER_STEP].float()
                if self.bias is not None:
                    part += self.bias[r : r + ROWS_PER_STEP].float()
                y[:, r : r + ROWS_PER_STEP] = part
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        """Shown in print(model)."""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=8, per-row scales"
