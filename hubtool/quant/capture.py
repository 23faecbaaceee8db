"""What the blocks of one chain receive: a calibration forward with every block stubbed out.

:func:`capture` runs the model over the calibration set with each block of the chain replaced by a stub
that records its arguments and passes the hidden states through (the last one stops the forward). It
keeps the first block's hidden states (the chain's inputs) and, for every block, the other positional
and keyword arguments per capture batch: attention masks and position embeddings can differ per layer
(Gemma 3's sliding-window layers get a banded mask, its full layers the causal one).

:meth:`Capture.arguments` collates the arguments of block j for any set of samples (tensors with a row
per sample are split and concatenated; the ones shared by a batch are kept once, moved to the device
once), and :meth:`Capture.call` runs a block on hidden states with them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import HubtoolError


class _Stop(Exception):
    """Raised by the last stub to end a capture forward early."""


class _Row:
    """One sample's slice of a batched tensor argument."""

    __slots__ = ("t",)

    def __init__(self, t: torch.Tensor):
        self.t = t


def _split(value: Any, batch_len: int, row: int) -> Any:
    """The part of a captured argument that belongs to ``row`` of a capture batch of ``batch_len`` samples."""
    if isinstance(value, torch.Tensor):
        if value.dim() >= 2 and value.shape[0] == batch_len:
            return _Row(value[row : row + 1])
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_split(v, batch_len, row) for v in value)
    if isinstance(value, dict):
        return {k: _split(v, batch_len, row) for k, v in value.items()}
    return value


def _merge(parts: list[Any], device: torch.device, memo: dict) -> Any:
    """Collate one argument from several samples' parts (rows concatenated, shared values kept once)."""
    p0 = parts[0]
    if any(isinstance(p, _Row) for p in parts):
        return torch.cat([p.t if isinstance(p, _Row) else p for p in parts]).to(device)
    if isinstance(p0, torch.Tensor):
        if all(p is p0 or _equal(p, p0, memo) for p in parts[1:]):
            key = ("dev", id(p0), str(device))
            if key not in memo:  # a shared tensor moves to the device once
                memo[key] = (p0, p0.to(device))
            return memo[key][1]
        if p0.dim() >= 2 and all(p.shape[0] == 1 for p in parts):
            return torch.cat(parts).to(device)
        raise RuntimeError("calibration batches disagree on a shared block argument")
    if isinstance(p0, (tuple, list)):
        return type(p0)(_merge([p[i] for p in parts], device, memo) for i in range(len(p0)))
    if isinstance(p0, dict):
        return {k: _merge([p[k] for p in parts], device, memo) for k in p0}
    return p0


def _equal(a: torch.Tensor, b: torch.Tensor, memo: dict) -> bool:
    key = ("eq", id(a), id(b))
    if key not in memo:  # captured tensors live as long as the memo: ids are not reused
        memo[key] = a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    return memo[key]


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


@dataclass
class Capture:
    """What the blocks of one chain receive, per capture batch: extra positional args and kwargs."""

    calls: list[list[tuple[tuple, dict]]]  # [block j][capture batch b] -> (args after hidden, kwargs)
    rows: list[tuple[int, int, int]] = field(default_factory=list)  # sample -> (batch b, row, batch size)
    hidden_as_keyword: bool = False  # hidden states passed as keyword ``hidden_states``
    returns_tuple: bool = False  # the block returns a tuple (hidden first)
    memo: dict = field(default_factory=dict)  # equality of shared tensors, their device copies

    def arguments(self, j: int, idx: list[int], device: torch.device) -> tuple[tuple, dict]:
        """Positional (after the hidden states) and keyword arguments of block j for samples ``idx``."""
        parts = []
        for s in idx:
            b, row, batch_len = self.rows[s]
            args, kwargs = self.calls[j][b]
            parts.append((_split(args, batch_len, row), _split(kwargs, batch_len, row)))
        args = _merge([p[0] for p in parts], device, self.memo)
        kwargs = _merge([p[1] for p in parts], device, self.memo)
        return tuple(args), dict(kwargs)

    def call(self, block: nn.Module, h: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """A block's output hidden states for input ``h`` and the other arguments from :meth:`arguments`."""
        out = block(*args, hidden_states=h, **kwargs) if self.hidden_as_keyword else block(h, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def capture(
    model: nn.Module, blocks: list[nn.Module], calib: Any, batch_size: int, keep_hidden: bool
) -> tuple[Capture, torch.Tensor | None]:
    """Run the model on the calibration set with every block of the chain stubbed out (identity): the
    blocks' arguments, and (with ``keep_hidden``) the first block's hidden states, on the CPU."""
    cap = Capture(calls=[[] for _ in blocks])
    hidden: list[torch.Tensor] = []
    state = {"probe": True}
    dev = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    originals = []

    def make_stub(j: int, forward):
        def stub(*args, **kwargs):
            if args:
                h, rest = args[0], tuple(args[1:])
            else:
                h, rest = kwargs.pop("hidden_states"), ()
                cap.hidden_as_keyword = True
            kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            cap.calls[j].append((_detach(rest), _detach(kwargs)))
            if j == 0:
                if keep_hidden:
                    hidden.append(h.detach().to("cpu"))
                if state["probe"]:  # learn the output structure from one real call
                    state["probe"] = False
                    out = forward(*args, **kwargs) if args else forward(hidden_states=h, **kwargs)
                    cap.returns_tuple = isinstance(out, tuple)
            if j == len(blocks) - 1:
                raise _Stop
            return (h,) if cap.returns_tuple else h

        return stub

    for j, block in enumerate(blocks):
        own = block.__dict__.get("forward")
        originals.append(own)
        block.forward = make_stub(j, own or block.forward)
    try:
        for idx, batch in calib.batches(batch_size):
            b = len(cap.calls[0])
            for row in range(len(idx)):
                cap.rows.append((b, row, len(idx)))
            inputs = {k: v.to(dev) for k, v in batch.items()}
            with contextlib.suppress(_Stop):
                model(**inputs, use_cache=False)
            if len(cap.calls[-1]) != b + 1:
                raise HubtoolError(
                    "the calibration forward did not reach every block to quantize",
                    "this architecture routes its inputs in a way hubtool does not support",
                )
    finally:
        for block, own in zip(blocks, originals, strict=True):
            if own is None:
                del block.forward
            else:
                block.forward = own
    return cap, (torch.cat(hidden) if keep_hidden else None)
