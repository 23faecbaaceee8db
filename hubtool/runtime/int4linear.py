"""Int4Linear: a linear layer whose weight is stored as GPTQ-packed int4 and computed by a kernel backend.

``runtime.backends`` picks the kernel for each call; ``replace_linears`` is the package's swap of named
submodules for loading (``runtime.hf_quantizer``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..core import packing
from ..core.intweight import IntWeight
from .backends import select_backend


class Int4Linear(nn.Module):
    """A drop-in ``nn.Linear`` with int4 weights in GPTQ v1 layout (qweight, qzeros, scales[, g_idx]).

    The state dict holds exactly the tensors of an auto_round / auto_gptq checkpoint, so the same module
    loads all three formats. The kernel is chosen per call (see ``runtime.backends``); ``backend`` pins one.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int = 128,
        bits: int = 4,
        dtype: torch.dtype = torch.bfloat16,
        with_g_idx: bool = False,
        backend: str | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if bits != 4:
            raise ValueError("Int4Linear stores int4 only")
        if in_features % group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of group size {group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.bits, self.backend = group_size, bits, backend
        groups = in_features // group_size
        self.register_buffer(
            "qweight", torch.zeros(in_features // 8, out_features, dtype=torch.int32, device=device)
        )
        self.register_buffer(
            "qzeros", torch.zeros(groups, out_features // 8, dtype=torch.int32, device=device)
        )
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, device=device))
        if with_g_idx:
            self.register_buffer("g_idx", packing.default_g_idx(in_features, group_size).to(device))
        else:
            self.g_idx = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self._prepared: dict[tuple[str, str], object] = {}
        self.last_backend: str | None = None

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_int_weight(
        cls, w: IntWeight, bias: torch.Tensor | None, dtype: torch.dtype, with_g_idx: bool = False
    ) -> Int4Linear:
        """Build a layer holding the packed form of ``w``."""
        n, k = w.shape
        layer = cls(k, n, bias is not None, w.group_size, w.bits, dtype, with_g_idx=with_g_idx)
        t = packing.pack(w)
        layer.qweight.copy_(t.qweight)
        layer.qzeros.copy_(t.qzeros)
        layer.scales.copy_(t.scales)
        if bias is not None:
            layer.bias.copy_(bias.detach().to(dtype))
        return layer

    def packed_tensors(self) -> packing.GPTQTensors:
        """The layer's GPTQ tensors (on the CPU)."""
        return packing.GPTQTensors(
            self.qweight.cpu(),
            self.qzeros.cpu(),
            self.scales.cpu(),
            None if self.g_idx is None else self.g_idx.cpu(),
        )

    def g_idx_or_none(self) -> torch.Tensor | None:
        """g_idx when it is not the trivial k // G, else None."""
        return None if self.trivial_g_idx else self.g_idx

    @property
    def trivial_g_idx(self) -> bool:
        """Whether groups are contiguous runs of G input rows (no act-order)."""
        cached = getattr(self, "_trivial", None)
        if cached is None:
            cached = packing.has_trivial_g_idx(
                None if self.g_idx is None else self.g_idx.cpu(), self.group_size
            )
            self._trivial = cached
        return cached

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (N, K) weight."""
        return packing.dequantize(self.qweight, self.qzeros, self.scales, self.g_idx_or_none(), dtype=dtype)

    # -- compute ------------------------------------------------------------------------------------
    def forget_prepared(self) -> None:
        """Drop the kernel layouts and the g_idx check made from older tensors (after the tensors change)."""
        self._prepared.clear()
        self._trivial = None

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: D401 - torch hook
        self.forget_prepared()
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._prepared.clear()
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x W^T + b through the selected kernel backend."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        backend = select_backend(self, x2, self.backend)
        key = (backend.name, str(x2.device))
        if key not in self._prepared:
            self._prepared[key] = backend.prepare(self, x2.device)
        self.last_backend = backend.name
        y = backend.matmul(x2, self._prepared[key], self)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        """Shown in print(model)."""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=4, group_size={self.group_size}"


def replace_linears(
    model: nn.Module,
    names: Iterable[str],
    factory: Callable[[str, nn.Linear], nn.Module],
) -> None:
    """Swap each named ``nn.Linear`` in ``model`` for ``factory(name, old)``."""
    for name in names:
        model.set_submodule(name, factory(name, model.get_submodule(name)))
