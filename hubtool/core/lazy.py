"""A model whose weights stay on disk: a meta-device skeleton that reads each module's tensors when it runs.

:class:`LazyWeights` serves the parameters of a skeleton (built on the meta device, buffers real) from the
source checkpoint, one module at a time:

* every module that owns parameters reads them just before its forward and gives them back (to the meta
  device) just after, so that a whole forward holds one module's weights at a time;
* :meth:`LazyWeights.held` keeps a module's weights (a decoder block being tuned) while a context lasts;
  its forward then reads nothing;
* :meth:`LazyWeights.tensor` reads one tensor by its name in the model, for exports;
* an ``nn.Embedding`` that is not held reads only the rows its input asks for (given ``read_rows``): the
  calibration forward of a model with a 128k vocabulary reads a few MB of its embedding, not all of it.

Tensors are cast to the skeleton's dtype exactly as ``from_pretrained`` casts them, so a module read here
holds the same bytes as the model loaded whole.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .memory import trim

log = logging.getLogger(__name__)


class LazyWeights:
    """The parameters of a meta-device ``model``, read on demand through ``read(name) -> tensor``."""

    def __init__(
        self,
        model: nn.Module,
        read: Callable[[str], torch.Tensor],
        names: Iterable[str],
        read_rows: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    ):
        self.model = model
        self._read = read
        self._read_rows = read_rows  # (name, sorted unique rows) -> those rows of the tensor
        self.names = set(names)  # the parameters the checkpoint provides (by name in the model)
        self._prefix = {m: n for n, m in model.named_modules(remove_duplicate=False)}
        self._aliases: dict[int, list[tuple[nn.Module, str]]] = {}  # tied parameters stay tied
        for m in model.modules():
            for attr, p in m._parameters.items():
                if p is not None:
                    self._aliases.setdefault(id(p), []).append((m, attr))
        self._held: dict[nn.Module, int] = {}
        self._hooks: list[Any] = []
        self.reads = 0  # tensors read so far (for tests and logs)

    # -- single tensors ------------------------------------------------------------------------
    def tensor(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The tensor ``name`` of the model, read from the checkpoint, with ``like``'s dtype and shape."""
        t = self._read(name)
        self.reads += 1
        if tuple(t.shape) != tuple(like.shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(t.shape)} != model shape {tuple(like.shape)}")
        return t.to(like.dtype) if t.dtype != like.dtype and like.is_floating_point() else t

    def tensor_chunks(self, name: str, like: torch.Tensor, max_bytes: int) -> Iterator[torch.Tensor]:
        """The tensor ``name`` as blocks of rows of at most ``max_bytes`` each (cast like :meth:`tensor`)."""
        row_bytes = max(1, like[:1].numel() * like.element_size())
        if self._read_rows is None or like.dim() < 2 or like.shape[0] * row_bytes <= max_bytes:
            yield self.tensor(name, like)
            return
        step = max(1, max_bytes // row_bytes)
        self.reads += 1
        for start in range(0, like.shape[0], step):
            t = self._read_rows(name, torch.arange(start, min(start + step, like.shape[0])))
            if tuple(t.shape[1:]) != tuple(like.shape[1:]):
                raise ValueError(
                    f"{name}: checkpoint rows of shape {tuple(t.shape[1:])} != {tuple(like.shape[1:])}"
                )
            yield t.to(like.dtype) if t.dtype != like.dtype and like.is_floating_point() else t

    # -- modules ---------------------------------------------------------------------------------
    def _params(self, module: nn.Module, recurse: bool) -> Iterator[tuple[nn.Module, str, str]]:
        """(owner, attribute, full name) of each parameter of ``module`` the checkpoint provides."""
        mods = module.named_modules(remove_duplicate=False) if recurse else [("", module)]
        for _, m in mods:
            prefix = self._prefix.get(m)
            if prefix is None:  # a module swapped in after the skeleton was built (e.g. a wrapper)
                continue
            for attr in list(m._parameters):
                full = f"{prefix}.{attr}" if prefix else attr
                if full in self.names:
                    yield m, attr, full

    def load(self, module: nn.Module, recurse: bool = True) -> int:
        """Read ``module``'s parameters that are still on the meta device; returns how many were read."""
        n = 0
        for m, attr, full in self._params(module, recurse):
            p = m._parameters[attr]
            if p is None or p.device.type != "meta":
                continue
            self._replace(p, nn.Parameter(self.tensor(full, p), requires_grad=p.requires_grad))
            n += 1
        return n

    def _replace(self, old: nn.Parameter, new: nn.Parameter) -> None:
        """Put ``new`` wherever ``old`` is (every module it is tied into)."""
        places = self._aliases.pop(id(old))
        for m, attr in places:
            m._parameters[attr] = new
        self._aliases[id(new)] = places

    def release(self, module: nn.Module, recurse: bool = True) -> None:
        """Give ``module``'s parameters back to the meta device (their memory is freed)."""
        for m, attr, _ in self._params(module, recurse):
            p = m._parameters[attr]
            if p is not None and p.device.type != "meta":
                empty = torch.empty(p.shape, dtype=p.dtype, device="meta")
                self._replace(p, nn.Parameter(empty, requires_grad=p.requires_grad))

    @contextlib.contextmanager
    def held(self, *modules: nn.Module) -> Iterator[None]:
        """While in this context ``modules`` keep their weights (read once); after it, they are released."""
        for m in modules:
            if not self._held.get(m):
                self.load(m)
            self._held[m] = self._held.get(m, 0) + 1
        try:
            yield
        finally:
            for m in modules:
                self._held[m] -= 1
                if not self._held[m]:
                    del self._held[m]
                    self.release(m)
            trim()  # a block's worth of freed memory goes back now, not at the end of the run

    def is_held(self, module: nn.Module) -> bool:
        """Whether ``module`` or a module around it is held."""
        name = self._prefix.get(module)
        for h in self._held:
            p = self._prefix.get(h)
            if h is module or p == "" or (name is not None and p is not None and name.startswith(p + ".")):
                return True
        return False

    # -- forward hooks -----------------------------------------------------------------------------
    def install(self) -> None:
        """Hook every module that owns parameters: read them before its forward, release them after."""
        if self._hooks:
            return
        for m in self.model.modules():
            if any(True for _ in self._params(m, recurse=False)):
                self._hooks.append(m.register_forward_pre_hook(self._before))
                self._hooks.append(m.register_forward_hook(self._after))

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _before(self, module: nn.Module, args: Any) -> Any:
        rows = self._embedding_rows(module, args)
        if rows is not None:
            return rows
        module._hubtool_lazy_read = self.load(module, recurse=False) > 0  # type: ignore[attr-defined]
        return None

    def _after(self, module: nn.Module, args: Any, output: Any) -> None:
        meta = module.__dict__.pop("_hubtool_lazy_rows", None)
        if meta is not None:  # put back what _embedding_rows swapped
            module._parameters["weight"], module.padding_idx = meta
        if module.__dict__.pop("_hubtool_lazy_read", False) and not self.is_held(module):
            self.release(module, recurse=False)

    def _embedding_rows(self, module: nn.Module, args: Any) -> tuple | None:
        """For an embedding on the meta device: its input's rows only, as a small weight and renumbered ids."""
        weight = module._parameters.get("weight") if isinstance(module, nn.Embedding) else None
        if (
            self._read_rows is None
            or weight is None
            or weight.device.type != "meta"
            or module.max_norm is not None
            or len(args) != 1
            or not isinstance(args[0], torch.Tensor)
            or args[0].is_floating_point()
            or self.is_held(module)
        ):
            return None
        names = [full for _, attr, full in self._params(module, recurse=False) if attr == "weight"]
        if not names:
            return None
        ids = args[0]
        rows, renumbered = torch.unique(ids.cpu(), sorted=True, return_inverse=True)
        t = self._read_rows(names[0], rows)
        self.reads += 1
        if tuple(t.shape[1:]) != tuple(weight.shape[1:]):
            raise ValueError(
                f"{names[0]}: checkpoint rows of shape {tuple(t.shape[1:])} != {tuple(weight.shape[1:])}"
            )
        t = t.to(weight.dtype) if t.dtype != weight.dtype else t
        # padding_idx only shapes gradients; F.embedding checks it against the (now smaller) row count
        module.__dict__["_hubtool_lazy_rows"] = (weight, module.padding_idx)
        module._parameters["weight"] = nn.Parameter(t.to(ids.device), requires_grad=False)
        module.padding_idx = None
        return (renumbered.to(ids.device),)


def is_lazy(model: nn.Module) -> bool:
    """Whether ``model`` is a skeleton served by :class:`LazyWeights` (see ``lazy_weights``)."""
    return lazy_weights(model) is not None


def lazy_weights(model: nn.Module) -> LazyWeights | None:
    """The :class:`LazyWeights` serving ``model``, if any."""
    return model.__dict__.get("_hubtool_lazy")


def attach(model: nn.Module, lazy: LazyWeights) -> None:
    """Make ``lazy`` the one serving ``model`` and install its hooks."""
    model.__dict__["_hubtool_lazy"] = lazy
    lazy.install()


@contextlib.contextmanager
def held(model: nn.Module, *modules: nn.Module) -> Iterator[None]:
    """``LazyWeights.held`` when ``model`` is lazy; nothing otherwise."""
    lazy = lazy_weights(model)
    if lazy is None:
        yield
        return
    with lazy.held(*modules):
        yield
