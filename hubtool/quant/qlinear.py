"""A block's linears while it is quantized: each runs its own weights, fixed codes, or SignRound's states.

* :class:`QLinear` stands in for an ``nn.Linear`` (:func:`quantized_linears` swaps them in and out);
* :class:`LinearGroup` runs the linears that read the same input (q/k/v, gate/up) as one matmul on their
  concatenated weights, in one of three modes: the original weights, fixed (dequantized) weights, or
  the tuning states (:func:`.signround.tuned_matmul`);
* :func:`use_codes` runs every linear of a block with given codes; :func:`running_codes` does the same
  for linears anywhere in a model, for the length of a ``with``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from ..core.intweight import IntWeight
from .layers import swap_module
from .signround import TunedLinear, tuned_matmul


class LinearGroup:
    """Linears of one block that read the same input, run as one matmul on their concatenated weights."""

    def __init__(self, members: list[QLinear]):
        self.members = members
        for m in members:
            m.group = self
        first = members[0].linear.weight
        self.dtype, self.device = first.dtype, first.device
        self.handle = torch.zeros((), device=self.device, requires_grad=True)
        self.sizes = [m.linear.out_features for m in members]
        biases = [m.linear.bias for m in members]
        self.bias = None
        if any(b is not None for b in biases):
            self.bias = torch.cat(
                [
                    b.detach() if b is not None else first.new_zeros(n)
                    for b, n in zip(biases, self.sizes, strict=True)
                ]
            )
        self.weight: torch.Tensor | None = None
        self.states: list[TunedLinear] | None = None
        self.use_original()

    def use_original(self) -> None:
        """Run with the model's own weights."""
        self.states = None
        ws = [m.linear.weight for m in self.members]
        self.weight = ws[0] if len(ws) == 1 else torch.cat(ws)
        self._x, self._outs = None, {}

    def use_fixed(self, weights: list[torch.Tensor]) -> None:
        """Run with these dequantized weights (one per member)."""
        self.states = None
        self.weight = None if not weights else weights[0] if len(weights) == 1 else torch.cat(weights)
        self._x, self._outs = None, {}

    def use_states(self, states: list[TunedLinear]) -> None:
        """Run with the fake-quantized weights of the tuning states."""
        self.states = states
        self.weight = None
        self._x, self._outs = None, {}

    def release(self) -> None:
        """Drop every reference (the group and its members point at each other)."""
        for m in self.members:
            m.group = None
        self.members, self.states, self.weight, self._x, self._outs = [], None, None, None, {}

    def joint(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's output for input x, concatenated in the last dimension (one matmul)."""
        if x.device != self.device:  # blocks spread over devices (--device-map)
            x = x.to(self.device)
        if self.states is None:
            return F.linear(x.to(self.weight.dtype), self.weight, self.bias)
        return tuned_matmul(x.to(self.dtype), self.handle, self.states, self.bias)

    def output(self, member: QLinear, x: torch.Tensor) -> torch.Tensor:
        """Member's output for input x; on a new input all members are computed at once."""
        key = id(member)
        if self._x is x and key in self._outs:
            return self._outs.pop(key)
        y = self.joint(x)
        if len(self.members) == 1:
            return y
        outs = [o.contiguous() for o in y.split(self.sizes, dim=-1)]  # strided views make every later op slow
        self._x = x
        self._outs = {id(m): o for m, o in zip(self.members, outs, strict=True) if m is not member}
        return outs[self.members.index(member)]


class QLinear(nn.Module):
    """Stands in for an nn.Linear inside a block while it is tuned or evaluated quantized."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self.group: LinearGroup | None = None
        LinearGroup([self])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The linear's output under its group's current mode."""
        return self.group.output(self, x)


def groups_of(linears: dict[str, QLinear]) -> list[LinearGroup]:
    """The distinct groups of these linears, in order."""
    seen: dict[int, LinearGroup] = {}
    for w in linears.values():
        seen.setdefault(id(w.group), w.group)
    return list(seen.values())


def group_states(linears: dict[str, QLinear], states: dict[str, TunedLinear]) -> None:
    """Run every linear with its tuning state (``states`` by the same names as ``linears``)."""
    names = {id(q): n for n, q in linears.items()}
    for g in groups_of(linears):
        g.use_states([states[names[id(m)]] for m in g.members])


def use_codes(linears: dict[str, QLinear], codes: dict[str, IntWeight]) -> None:
    """Run every linear with its dequantized ``codes`` (by the same names as ``linears``)."""
    names = {id(q): n for n, q in linears.items()}
    for g in groups_of(linears):
        w = g.members[0].linear.weight
        g.use_fixed([])  # the previous fixed weights go first
        dev = codes[names[id(g.members[0])]].q.device
        joint = torch.empty(sum(g.sizes), w.shape[1], dtype=w.dtype, device=dev)  # no list + cat copy
        for m, part in zip(g.members, joint.split(g.sizes), strict=True):
            codes[names[id(m)]].dequantize(w.dtype, out=part)
        g.use_fixed([joint.to(w.device)])


@contextlib.contextmanager
def quantized_linears(block: nn.Module, names: list[str]) -> Iterator[dict[str, QLinear]]:
    """While in this context, the named linears of ``block`` are :class:`QLinear` (running their own
    weights until told otherwise), yielded by name; after it, the block is as it was."""
    linears: dict[str, QLinear] = {}
    undos = []
    try:
        for n in names:
            linears[n] = QLinear(block.get_submodule(n))
            undos.append(swap_module(block, n, linears[n]))
        yield linears
    finally:
        for undo in reversed(undos):
            undo()
        for g in groups_of(linears):
            g.release()
        linears.clear()


@contextlib.contextmanager
def running_codes(model: nn.Module, codes: dict[str, IntWeight]) -> Iterator[None]:
    """While in this context, the model's linears named in ``codes`` run with their dequantized codes."""
    undos = []
    try:
        for name, iw in codes.items():
            lin = model.get_submodule(name)
            q = QLinear(lin)
            q.group.use_fixed([iw.dequantize(lin.weight.dtype).to(lin.weight.device)])
            undos.append(swap_module(model, name, q))
        yield
    finally:
        for undo in reversed(undos):
            undo()
