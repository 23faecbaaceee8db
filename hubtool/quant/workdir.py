"""The work directory of a block-by-block run: finished blocks and the next block's inputs, for ``--resume``.

Layout: ``block-NNNNN.safetensors`` (one finished block's codes, 4-bit codes two per byte, its losses
in the metadata),
``inputs.safetensors`` (the next block's inputs on the 16-bit and the quantized path) and
``state.json`` (the run's :func:`fingerprint` and how many blocks are done: the commit point of a block).
Every file is written atomically. A run resumes only a directory made with the same fingerprint.
The codes of a run stay here until its exports are written: :meth:`WorkDir.codes` reads them back one
block at a time, so a model's codes are never all in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.fsio import atomic_save_tensors, atomic_write_text
from ..core.intweight import IntWeight, PackedWeight
from ..core.kquant import FIELDS as KQUANT_FIELDS
from ..core.kquant import KQuantScales
from ..core.spec import QuantSpec
from ..errors import HubtoolError
from ..record import BlockLoss
from .layers import QuantPlan
from .spec import Recipe

log = logging.getLogger(__name__)


def fingerprint(
    model: nn.Module, plan: QuantPlan, spec: QuantSpec, method: str, recipe: Recipe, calib: Any
) -> dict[str, Any]:
    """What makes a run: method, spec, recipe, calibration, sample shape and the shapes of the planned linears."""
    shapes = hashlib.sha256()
    for b in plan.blocks:
        for n in b.full_names():
            w = model.get_submodule(n).weight
            shapes.update(f"{n}:{tuple(w.shape)}:{w.dtype};".encode())
    return {
        "layout": 2,  # codes packed two per byte
        "method": method,
        "spec": asdict(spec),
        "recipe": {k: v for k, v in asdict(recipe).items() if k != "name"} if recipe else None,
        "calibration": asdict(calib.info) if calib is not None else None,
        "samples": [len(calib), int(calib.samples[0]["input_ids"].shape[-1])] if calib is not None else None,
        "blocks": shapes.hexdigest(),
    }


class WorkDir:
    """Finished blocks and the next block's inputs, so that an interrupted run can continue."""

    STATE = "state.json"

    def __init__(self, path: Path, spec: QuantSpec, fingerprint: dict[str, Any]):
        self.path = path
        self.spec = spec  # of the codes saved here
        self.fingerprint = fingerprint

    def start(self, resume: bool) -> int:
        """Number of blocks already finished (0 unless resuming a matching run)."""
        state_file = self.path / self.STATE
        if not resume or not state_file.is_file():
            if resume:
                log.info("nothing to resume in %s: starting from the first block", self.path)
            if self.path.is_dir():
                for p in self.path.glob("*.safetensors"):
                    p.unlink()
                state_file.unlink(missing_ok=True)
            return 0
        try:
            state = json.loads(state_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise HubtoolError(f"cannot resume: {state_file} is unreadable ({exc})", "start over") from None
        if state.get("fingerprint") != self.fingerprint:
            raise HubtoolError(
                f"cannot resume: {self.path} was made with other settings, data or model",
                "run again with the same options, or without --resume",
            )
        return int(state["done"])

    def save_block(self, i: int, loss: BlockLoss, weights: dict[str, IntWeight]) -> None:
        """Store block i's codes and losses."""
        tensors = {}
        for name, w in weights.items():
            if PackedWeight.fits(w):
                tensors[f"{name}::nibbles"] = PackedWeight.pack(w).nibbles
            else:
                tensors[f"{name}::q"] = w.q
            tensors[f"{name}::scale"] = w.scale
            tensors[f"{name}::zero"] = w.zero
            if w.kquant is not None:
                for field in KQUANT_FIELDS:
                    tensors[f"{name}::kquant.{field}"] = getattr(w.kquant, field)
        meta = {"block": loss.block, "rtn": repr(loss.rtn), "tuned": repr(loss.tuned)}
        meta["names"] = json.dumps(list(weights))
        atomic_save_tensors(tensors, self.path / f"block-{i:05d}.safetensors", meta)

    def _block_file(self, i: int) -> Path:
        path = self.path / f"block-{i:05d}.safetensors"
        if not path.is_file():
            raise HubtoolError(f"cannot resume: {path.name} is missing from {self.path}", "start over")
        return path

    def block_info(self, i: int) -> tuple[BlockLoss, list[str]]:
        """Block i's losses and the names of its linears (no codes read)."""
        from safetensors import safe_open

        with safe_open(str(self._block_file(i)), framework="pt") as f:
            meta = f.metadata()
        loss = BlockLoss(meta["block"], float(meta["rtn"]), float(meta["tuned"]))
        return loss, json.loads(meta["names"])

    def load_block(self, i: int) -> tuple[BlockLoss, dict[str, IntWeight]]:
        """Block i's losses and codes."""
        from safetensors import safe_open

        loss, names = self.block_info(i)
        weights = {}
        with safe_open(str(self._block_file(i)), framework="pt") as f:
            keys = set(f.keys())
            for n in names:
                scale, zero = f.get_tensor(f"{n}::scale"), f.get_tensor(f"{n}::zero")
                g, bits = self.spec.group_size, self.spec.bits
                kq = None
                if f"{n}::kquant.d" in keys:
                    kq = KQuantScales(*(f.get_tensor(f"{n}::kquant.{x}") for x in KQUANT_FIELDS))
                if f"{n}::nibbles" in keys:
                    weights[n] = PackedWeight(f.get_tensor(f"{n}::nibbles"), scale, zero, g, kq).unpack()
                else:
                    weights[n] = IntWeight(f.get_tensor(f"{n}::q"), scale, zero, g, bits, kq)
        return loss, weights

    def codes(self) -> StoredCodes:
        """The codes of every finished block, read from here when asked for (see :class:`StoredCodes`)."""
        return StoredCodes(self)

    def save_inputs(self, i: int, fp: torch.Tensor, q: torch.Tensor) -> None:
        """The 16-bit and quantized-path inputs of block i."""
        atomic_save_tensors({"fp": fp, "q": q}, self.path / "inputs.safetensors", {"block": str(i)})

    def load_inputs(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs saved for block i (16-bit path, quantized path)."""
        from safetensors import safe_open

        path = self.path / "inputs.safetensors"
        if not path.is_file():
            raise HubtoolError(f"cannot resume: {path} is missing", "start over")
        with safe_open(str(path), framework="pt") as f:
            if f.metadata().get("block") != str(i):
                raise HubtoolError(f"cannot resume: {path} does not hold block {i}'s inputs", "start over")
            return f.get_tensor("fp"), f.get_tensor("q")

    def commit(self, done: int) -> None:
        """Record that ``done`` blocks are finished (the commit point of a block)."""
        atomic_write_text(self.path / self.STATE, json.dumps({"fingerprint": self.fingerprint, "done": done}))


class StoredCodes(Mapping[str, IntWeight]):
    """The finished linears of a work directory (full name -> IntWeight), read one block at a time.

    Names come in the order the blocks were quantized; the last block read is cached, so walking the
    names in order reads each block file once.
    """

    def __init__(self, work: WorkDir):
        self._work = work
        self._where: dict[str, int] = {}
        state = (
            json.loads((work.path / WorkDir.STATE).read_text())
            if (work.path / WorkDir.STATE).is_file()
            else {}
        )
        for i in range(int(state.get("done", 0))):
            for n in work.block_info(i)[1]:
                self._where[n] = i
        self._cached: tuple[int, dict[str, IntWeight]] | None = None

    def __getitem__(self, name: str) -> IntWeight:
        i = self._where[name]
        if self._cached is None or self._cached[0] != i:
            self._cached = None  # the previous block is freed before the next is read
            self._cached = (i, self._work.load_block(i)[1])
        return self._cached[1][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)
