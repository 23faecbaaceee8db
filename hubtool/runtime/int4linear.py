"""Int4Linear: a linear layer whose weight is stored as GPTQ-packed int4 and computed by a kernel backend.

``runtime.backends`` picks the kernel for each call; ``replace_linears`` is the package's swap of named
submodules for loading (``runtime.hf_quantizer``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..core import memory, packing
from ..core.intweight import IntWeight
from ..kernels import cpu
from .backends import ENV_VAR, HUBTOOL_DTYPES, get_backend, select_backend

KERNEL_KEY = ("hubtool", "cpu")  # the prepared entry of hubtool's CPU kernel


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
        self._compact: cpu.Packed | None = None  # set by compact(): qweight lives only in this layout
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

    # -- compact storage on the CPU -----------------------------------------------------------------
    def compact(self) -> bool:
        """Keep the weight only in the CPU kernel's layout: repack now, drop ``qweight``; False where the kernel would not serve this layer.

        ``qweight`` is rebuilt, bit for bit, wherever it is read (``state_dict``, ``packed_tensors``,
        another backend, a move to another device). The pages it occupied in a memory-mapped checkpoint
        stop counting in the process's memory, so a loaded model holds one copy of its int4 weights.
        """
        if self._compact is not None:
            return True
        qweight = self._buffers.get("qweight")
        if qweight is None or qweight.device.type != "cpu" or qweight.is_meta:
            return False
        if self.backend not in (None, "hubtool") or os.environ.get(ENV_VAR, "auto") not in (
            "auto",
            "hubtool",
        ):
            return False
        probe = torch.empty(0, self.in_features, dtype=torch.bfloat16)
        if not get_backend("hubtool").supports(self, probe):
            return False
        packed = self._prepared.get(KERNEL_KEY) or get_backend("hubtool").prepare(self, qweight.device)
        self._prepared[KERNEL_KEY] = self._compact = packed
        del self._buffers["qweight"]
        memory.release_file_pages(qweight)
        return True

    def expand(self) -> None:
        """Undo :meth:`compact`: ``qweight`` is a buffer again (rebuilt from the kernel's layout)."""
        if self._compact is not None:
            qweight = self._rebuilt_qweight()
            self._compact = None
            self._buffers["qweight"] = qweight

    def _rebuilt_qweight(self) -> torch.Tensor:
        return packing.pack_codes(cpu.unrepack(self._compact))

    def __getattr__(self, name: str):
        if name == "qweight" and self.__dict__.get("_compact") is not None:
            return self._rebuilt_qweight()
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:
        if name == "qweight" and self.__dict__.get("_compact") is not None:
            self._compact = None
            self._prepared.clear()
            self._buffers["qweight"] = value
            return
        super().__setattr__(name, value)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: D401 - torch hook
        if self._compact is not None:
            destination[prefix + "qweight"] = self._rebuilt_qweight()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    # -- compute ------------------------------------------------------------------------------------
    def forget_prepared(self) -> None:
        """Drop the kernel layouts and the g_idx check made from older tensors (after the tensors change)."""
        self.expand()
        self._prepared.clear()
        self._trivial = None

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: D401 - torch hook
        self.forget_prepared()
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self.forget_prepared()
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x W^T + b through the selected kernel backend."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        packed = self._compact
        if (  # a compact layer is one auto sends to the CPU kernel: no dispatch (a decode step's overhead)
            packed is not None
            and x.device.type == "cpu"
            and x.dtype in HUBTOOL_DTYPES
            and (self.backend or os.environ.get(ENV_VAR) or "auto") in ("auto", "hubtool")
        ):
            self.last_backend = "hubtool"
            y = cpu.int4_mm(x2, packed)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
            return y.reshape(*shape[:-1], self.out_features)
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
