"""Block-by-block quantization with calibration data: ``--method opt-rtn`` and ``--method signround``.

For each chain of blocks (the language model's decoder layers; the vision encoder's layers too with
``--quantize-vision``) the inputs of the first block are captured with a forward pass over the
calibration samples (every block's keyword arguments too: attention masks and position embeddings can
differ per layer, e.g. Gemma 3's sliding-window layers). Then, block by block:

1. the 16-bit block runs on the 16-bit inputs: the reference outputs (the next block's 16-bit inputs),
   while hooks accumulate ``X^T X`` of every linear's input;
2. RTN's loss is measured on the quantized path (the block fed with the outputs of the blocks already
   quantized, compared with the reference);
3. a per-group clipping search minimizes each linear's output error (:mod:`.optrtn`);
4. ``signround`` tunes V, alpha, beta from there with SignSGD (:mod:`.signround`), keeping the best
   iterate;
5. the final codes run once more on the quantized path: their loss, and the next block's inputs.
   If that loss is above RTN's, RTN's codes are kept for the block (so the result is never worse than
   RTN on the calibration data).

One block is on the device at a time; the activations stay on the CPU in the model dtype (three
buffers of nsamples x seqlen x hidden at most), so memory does not grow with depth beyond the finished
codes, which are held two per byte (:class:`.rtn.PackedWeight`). On the CPU the block's attention runs
:mod:`.attention` (eager attention's function, SDPA's precision, a faster backward). With ``work_dir``
every finished block is saved (safetensors, atomic) with the next block's inputs, and ``resume=True``
continues from there; the batch order of block i depends only on (seed, i), so a resumed run gives the
same bytes as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import json
import logging
import math
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.fsio import atomic_save_tensors, atomic_write_text
from ..core.intweight import IntWeight, PackedWeight
from ..core.spec import QuantSpec
from ..errors import HubtoolError
from ..record import BlockLoss
from .attention import cpu_tuning_attention
from .driver import ProgressEvent, ProgressFn, QuantResult
from .fused import cpu_fused_ops
from .layers import BlockPlan, QuantPlan
from .optrtn import HessianCollector, quantize_clipped, search_clip
from .rtn import quantize_rtn
from .signround import LinearGroup, QLinear, Scratch, TunedLinear
from .spec import Recipe

log = logging.getLogger(__name__)

LOSS_SCALE = 1000.0  # as auto-round: the MSE is scaled before backward
PROGRESS_EVERY = 10  # iterations between progress events
# Block losses (RTN and final, for the table and the keep-RTN check) are measured on the first calibration
# batch: the RTN loss is then one batch's forward, not another pass over every sample (about 8% of a light-
# recipe run with 128 samples, by count of forward passes; 2% of the README's SignRound benchmark, measured).
LOSS_BATCHES = 1


def quantize_blockwise(
    model: nn.Module,
    plan: QuantPlan,
    spec: QuantSpec,
    method: str,
    recipe: Recipe | None,
    calib: Any,
    *,
    device: str = "cpu",
    work_dir: Path | None = None,
    resume: bool = False,
    progress: ProgressFn | None = None,
    device_map: str | None = None,
) -> QuantResult:
    """Quantize every block of ``plan`` with opt-rtn or SignRound on the calibration set ``calib``."""
    if method not in ("opt-rtn", "signround"):
        raise HubtoolError(f"quantize_blockwise does not run method {method!r}")
    if calib is None or len(calib) == 0:
        raise HubtoolError(f"--method {method} needs calibration data", "pass --calib or use --method rtn")
    recipe = recipe or Recipe()
    runner = _Runner(model, plan, spec, method, recipe, calib, device, device_map, progress)
    return runner.run(Path(work_dir) if work_dir else None, resume)


# -- capture of block inputs -----------------------------------------------------------------------
class _Stop(Exception):
    """Raised by the last stub to end a capture forward early."""


class _Row:
    """One sample's slice of a batched tensor argument."""

    __slots__ = ("t",)

    def __init__(self, t: torch.Tensor):
        self.t = t


def _split(value: Any, bc: int, row: int) -> Any:
    """The part of a captured argument that belongs to ``row`` of a capture batch of ``bc`` samples."""
    if isinstance(value, torch.Tensor):
        if value.dim() >= 2 and value.shape[0] == bc:
            return _Row(value[row : row + 1])
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_split(v, bc, row) for v in value)
    if isinstance(value, dict):
        return {k: _split(v, bc, row) for k, v in value.items()}
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


@dataclass
class _Capture:
    """What the blocks of one chain receive, per capture batch: extra positional args and kwargs."""

    calls: list[list[tuple[tuple, dict]]]  # [block j][capture batch b] -> (args after hidden, kwargs)
    where: list[tuple[int, int, int]] = field(default_factory=list)  # sample -> (batch b, row, batch size)
    hidden_kw: bool = False  # hidden states passed as keyword ``hidden_states``
    tuple_out: bool = False  # the block returns a tuple (hidden first)
    memo: dict = field(default_factory=dict)  # equality of shared tensors, their device copies

    def arguments(self, j: int, idx: list[int], device: torch.device) -> tuple[tuple, dict]:
        """Positional (after the hidden states) and keyword arguments of block j for samples ``idx``."""
        parts = []
        for s in idx:
            b, row, bc = self.where[s]
            args, kwargs = self.calls[j][b]
            parts.append((_split(args, bc, row), _split(kwargs, bc, row)))
        args = _merge([p[0] for p in parts], device, self.memo)
        kwargs = _merge([p[1] for p in parts], device, self.memo)
        return tuple(args), dict(kwargs)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _capture(
    model: nn.Module, blocks: list[nn.Module], calib: Any, batch_size: int, want_hidden: bool
) -> tuple[_Capture, torch.Tensor | None]:
    """Run the model on the calibration set with every block of the chain stubbed out (identity)."""
    cap = _Capture(calls=[[] for _ in blocks])
    hidden: list[torch.Tensor] = []
    state = {"probe": True}
    dev = _model_device(model)
    originals = []

    def make_stub(j: int, block: nn.Module, forward):
        def stub(*args, **kwargs):
            if args:
                h, rest = args[0], tuple(args[1:])
            else:
                h, rest = kwargs.pop("hidden_states"), ()
                cap.hidden_kw = True
            kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            cap.calls[j].append((_detach(rest), _detach(kwargs)))
            if j == 0:
                if want_hidden:
                    hidden.append(h.detach().to("cpu"))
                if state["probe"]:  # learn the output structure from one real call
                    state["probe"] = False
                    out = forward(*args, **kwargs) if args else forward(hidden_states=h, **kwargs)
                    cap.tuple_out = isinstance(out, tuple)
            if j == len(blocks) - 1:
                raise _Stop
            return (h,) if cap.tuple_out else h

        return stub

    for j, block in enumerate(blocks):
        own = block.__dict__.get("forward")
        originals.append(own)
        block.forward = make_stub(j, block, own or block.forward)
    try:
        for idx, batch in calib.batches(batch_size):
            b = len(cap.calls[0])
            for row in range(len(idx)):
                cap.where.append((b, row, len(idx)))
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
    return cap, (torch.cat(hidden) if want_hidden else None)


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


# -- the work directory (resume) -------------------------------------------------------------------
class _WorkDir:
    """Finished blocks and the next block's inputs, so that an interrupted run can continue."""

    STATE = "state.json"

    def __init__(self, path: Path, fingerprint: dict[str, Any]):
        self.path = path
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
            tensors[f"{name}::q"] = w.q
            tensors[f"{name}::scale"] = w.scale
            tensors[f"{name}::zero"] = w.zero
        meta = {"block": loss.block, "rtn": repr(loss.rtn), "tuned": repr(loss.tuned)}
        meta["names"] = json.dumps(sorted(weights))
        atomic_save_tensors(tensors, self.path / f"block-{i:05d}.safetensors", meta)

    def load_block(self, i: int, spec: QuantSpec) -> tuple[BlockLoss, dict[str, IntWeight]]:
        """Block i's losses and codes."""
        from safetensors import safe_open

        path = self.path / f"block-{i:05d}.safetensors"
        if not path.is_file():
            raise HubtoolError(f"cannot resume: {path.name} is missing from {self.path}", "start over")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            weights = {
                n: IntWeight(
                    f.get_tensor(f"{n}::q"),
                    f.get_tensor(f"{n}::scale"),
                    f.get_tensor(f"{n}::zero"),
                    spec.group_size,
                    spec.bits,
                )
                for n in json.loads(meta["names"])
            }
        return BlockLoss(meta["block"], float(meta["rtn"]), float(meta["tuned"])), weights

    def save_inputs(self, i: int, fp: torch.Tensor, q: torch.Tensor) -> None:
        """The 16-bit and quantized-path inputs of block i."""
        atomic_save_tensors({"fp": fp, "q": q}, self.path / "inputs.safetensors", {"block": str(i)})

    def load_inputs(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs saved for block i."""
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


# -- the runner ------------------------------------------------------------------------------------
class _IndexSampler:
    """Shuffled batches of sample indices; reshuffles once fewer than a batch remain (like auto-round)."""

    def __init__(self, n: int, batch: int, rng: random.Random):
        self.n, self.batch, self.rng = n, batch, rng
        self.order: list[int] = []
        self.pos = 0

    def next(self) -> list[int]:
        """The next batch."""
        if self.pos + self.batch > len(self.order):
            self.order = list(range(self.n))
            self.rng.shuffle(self.order)
            self.pos = 0
        idx = self.order[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return idx


def _parse_device_map(device_map: str | None) -> list[torch.device]:
    if not device_map:
        return []
    if device_map == "auto":
        return [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    return [torch.device(d.strip()) for d in device_map.split(",") if d.strip()]


class _Runner:
    def __init__(self, model, plan, spec, method, recipe, calib, device, device_map, progress):
        self.model = model
        self.plan = plan
        self.spec = spec
        self.method = method
        self.recipe = recipe
        self.calib = calib
        self.device = torch.device(device)
        self.devices = _parse_device_map(device_map)
        if self.devices:
            self.device = self.devices[0]
        self.progress = progress
        self.batch_size = max(1, min(recipe.batch_size, len(calib)))
        self.iters = recipe.iters if method == "signround" else 0
        self.amp = self.device.type == "cuda"
        self.weights: dict[str, PackedWeight | IntWeight] = {}  # finished linears, 4-bit codes packed
        self.losses: list[BlockLoss] = []
        self.grad_kinds: set[str] = set()  # precisions of dL/dW seen while tuning
        mask = (
            torch.cat([s["attention_mask"] for s in calib.samples])
            if "attention_mask" in calib.samples[0]
            else None
        )
        self.mask = mask.bool() if mask is not None else None

    # chains of consecutive blocks from the same ModuleList
    def _chains(self) -> list[list[int]]:
        chains: list[list[int]] = []
        prev = None
        for i, b in enumerate(self.plan.blocks):
            parent = b.name.rsplit(".", 1)[0]
            if parent != prev:
                chains.append([])
                prev = parent
            chains[-1].append(i)
        return chains

    def _fingerprint(self) -> dict[str, Any]:
        info = getattr(self.calib, "info", None)
        shapes = hashlib.sha256()
        for b in self.plan.blocks:
            for n in b.full_names():
                w = self.model.get_submodule(n).weight
                shapes.update(f"{n}:{tuple(w.shape)}:{w.dtype};".encode())
        return {
            "method": self.method,
            "spec": asdict(self.spec),
            "recipe": {k: v for k, v in asdict(self.recipe).items() if k != "name"},
            "calibration": asdict(info) if info is not None else None,
            "samples": [len(self.calib), int(self.calib.samples[0]["input_ids"].shape[-1])],
            "blocks": shapes.hexdigest(),
        }

    def run(self, work_dir: Path | None, resume: bool) -> QuantResult:
        # the objects alive now (the model, transformers) are left out of the per-block garbage
        # collections: a full collection over them costs 0.2 s, for nothing
        gc.freeze()
        try:
            with self._eval_mode():
                return self._run(work_dir, resume)
        finally:
            gc.unfreeze()

    @contextlib.contextmanager
    def _eval_mode(self):
        """No dropout while block outputs are compared; the model's mode is restored after."""
        training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(training)

    def _run(self, work_dir: Path | None, resume: bool) -> QuantResult:
        wd = _WorkDir(work_dir, self._fingerprint()) if work_dir else None
        done = wd.start(resume) if wd else 0
        total = len(self.plan.blocks)
        for i in range(done):
            loss, weights = wd.load_block(i, self.spec)
            self.weights.update({n: _keep(w) for n, w in weights.items()})
            self.losses.append(loss)
            self._emit(
                ProgressEvent(
                    i, total, self.plan.blocks[i].name, done=True, rtn_loss=loss.rtn, loss=loss.tuned
                )
            )
        if done:
            log.info("resuming after %d finished blocks", done)
        for chain in self._chains():
            pending = [i for i in chain if i >= done]
            if not pending:
                continue
            blocks = [self.model.get_submodule(self.plan.blocks[i].name) for i in chain]
            at_start = pending[0] == chain[0]
            cap, hidden = _capture(self.model, blocks, self.calib, self.batch_size, want_hidden=at_start)
            if at_start:
                bufs = {"fp": hidden, "q": hidden}
                earlier = self._earlier_weights(chain[0])
                if earlier:  # the quantized path enters this chain through the blocks already quantized
                    with self._quantized(earlier):
                        bufs["q"] = _capture(self.model, blocks[:1], self.calib, self.batch_size, True)[1]
            else:
                fp_in, q_in = wd.load_inputs(pending[0])
                bufs = {"fp": fp_in, "q": q_in}
                del fp_in, q_in
            del hidden
            for i in pending:
                j = chain.index(i)
                with cpu_tuning_attention(blocks[j], self.device), cpu_fused_ops(blocks[j], self.device):
                    self._block(i, j, blocks[j], cap, bufs, last=i == chain[-1])
                if wd:
                    nxt = i + 1
                    wd.save_block(
                        i,
                        self.losses[-1],
                        {n: _codes(self.weights[n]) for n in self.plan.blocks[i].full_names()},
                    )
                    if i != chain[-1]:
                        wd.save_inputs(nxt, bufs["fp"], bufs["q"])
                    wd.commit(nxt)
                loss = self.losses[-1]
                self._emit(
                    ProgressEvent(
                        i,
                        total,
                        self.plan.blocks[i].name,
                        done=True,
                        iters=self.iters,
                        iteration=self.iters,
                        rtn_loss=loss.rtn,
                        loss=loss.tuned,
                    )
                )
        weights = {}
        for n in list(self.weights):  # unpacked one by one, so the codes are never held twice
            weights[n] = _codes(self.weights.pop(n))
        kinds = ",".join(sorted(self.grad_kinds)) or None
        return QuantResult(weights=weights, block_losses=self.losses, weight_grad=kinds)

    def _emit(self, ev: ProgressEvent) -> None:
        if self.progress:
            self.progress(ev)

    def _earlier_weights(self, first: int) -> dict[str, IntWeight]:
        names = {n for b in self.plan.blocks[:first] for n in b.full_names()}
        return {n: _codes(w) for n, w in self.weights.items() if n in names}

    @contextlib.contextmanager
    def _quantized(self, weights: dict[str, IntWeight]):
        """Temporarily run the given linears with their dequantized codes (yields whether any)."""
        swaps = []
        try:
            for name, iw in weights.items():
                lin = self.model.get_submodule(name)
                q = QLinear(lin)
                q.group.use_fixed([iw.dequantize(lin.weight.dtype).to(lin.weight.device)])
                swaps.append(_swap(self.model, name, q))
            yield bool(swaps)
        finally:
            for undo in reversed(swaps):
                undo()

    # one block ------------------------------------------------------------------------------------
    def _block(self, i: int, j: int, block: nn.Module, cap: _Capture, bufs: dict, last: bool) -> None:
        """Quantize block i (j-th of its chain); ``bufs`` holds the inputs ("fp", "q"), replaced by outputs."""
        bp: BlockPlan = self.plan.blocks[i]
        seed_rng = random.Random(self.recipe.seed * 1_000_003 + i)
        torch.manual_seed(self.recipe.seed * 1_000_003 + i)
        moved, undo_dispatch = self._place(block)
        flags = [(p, p.requires_grad) for p in block.parameters()]
        for p, _ in flags:
            p.requires_grad_(False)
        wrappers: dict[str, QLinear] = {}
        undos = []
        try:
            for n in bp.linears:
                wrappers[n] = QLinear(block.get_submodule(n))
                undos.append(_swap(block, n, wrappers[n]))
            text = bp.tower == "text"
            # 1. reference outputs + X^T X
            collector = HessianCollector(wrappers, self.spec.group_size)
            try:
                fp_out = self._pass(block, j, cap, bufs.pop("fp"), None, collector, text)[1]
            finally:
                collector.remove()
            q_in = bufs.pop("q")
            for names in collector.groups.values():  # linears reading the same input: one matmul
                LinearGroup([wrappers[n] for n in names])
            # 2. RTN on the quantized path (its loss on the evaluation batch)
            rtn = {n: quantize_rtn(w.linear.weight.detach(), self.spec) for n, w in wrappers.items()}
            self._fix(wrappers, rtn)
            rtn_loss = self._pass(
                block, j, cap, q_in, fp_out, None, text, keep=False, loss_batches=LOSS_BATCHES
            )[0]
            # 3. the clipping search
            clips = {
                n: search_clip(w.linear.weight, collector.h.get(n), self.spec) for n, w in wrappers.items()
            }
            if self.iters > 0:
                final = self._tune(i, block, j, cap, wrappers, clips, q_in, fp_out, text, seed_rng, rtn_loss)
            else:
                final = {
                    n: quantize_clipped(w.linear.weight, self.spec, clips[n]) for n, w in wrappers.items()
                }
            # 5. final codes on the quantized path
            self._fix(wrappers, final)
            loss, q_out = self._pass(
                block, j, cap, q_in, fp_out, None, text, keep=not last, loss_batches=LOSS_BATCHES
            )
            if not loss <= rtn_loss:
                log.info("%s: tuned loss %.4g above RTN's %.4g: keeping RTN", bp.name, loss, rtn_loss)
                final, loss = {n: _cpu(w) for n, w in rtn.items()}, rtn_loss
                if not last:
                    self._fix(wrappers, rtn)
                    q_out = self._pass(block, j, cap, q_in, fp_out, None, text)[1]
            for n, w in final.items():
                self.weights[f"{bp.name}.{n}"] = _keep(_cpu(w))
            self.losses.append(BlockLoss(bp.name, float(rtn_loss), float(loss)))
            log.info("%s: loss RTN %.4g -> %s %.4g", bp.name, rtn_loss, self.method, loss)
        finally:
            for undo in reversed(undos):
                undo()
            for g in _groups(wrappers):
                g.release()
            wrappers.clear()
            for p, flag in flags:
                p.requires_grad_(flag)
            undo_dispatch()
            if moved is not None:
                block.to(moved)
            _release_memory(self.device)
        bufs["fp"], bufs["q"] = fp_out, q_out

    def _place(self, block: nn.Module):
        """Put the block on the device (or spread it over --device-map); returns (device to go back to, undo)."""
        home = next(block.parameters()).device
        if len(self.devices) > 1:
            return None, _dispatch(block, self.devices, home)
        if home != self.device:
            block.to(self.device)
            return home, lambda: None
        return None, lambda: None

    def _fix(self, wrappers: dict[str, QLinear], weights: dict[str, IntWeight]) -> None:
        """Run every linear with the dequantized ``weights``."""
        for g in _groups(wrappers):
            lin = g.members[0].linear.weight
            names = [_name_of(wrappers, m) for m in g.members]
            g.use_fixed([weights[n].dequantize(lin.dtype).to(lin.device) for n in names])

    def _mask(self, idx: list[int], length: int, text: bool) -> torch.Tensor | None:
        if not text or self.mask is None or self.mask.shape[1] != length or bool(self.mask[idx].all()):
            return None
        return self.mask[idx].to(self.device)

    def _autocast(self):
        if self.amp:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward(
        self, block: nn.Module, j: int, cap: _Capture, h: torch.Tensor, idx: list[int]
    ) -> torch.Tensor:
        args, kwargs = cap.arguments(j, idx, self.device)
        with self._autocast():
            out = block(*args, hidden_states=h, **kwargs) if cap.hidden_kw else block(h, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def _pass(self, block, j, cap, inputs, ref, collector, text, keep=True, loss_batches=None):
        """Run the block over the samples: (mean masked MSE vs ``ref`` over the first ``loss_batches``
        batches (None: all) or nan, outputs or None). Without ``keep`` it stops after those batches."""
        out_buf = torch.empty_like(inputs) if keep else None
        total, count = 0.0, 0
        n = inputs.shape[0]
        for b, start in enumerate(range(0, n, self.batch_size)):
            scored = loss_batches is None or b < loss_batches
            if not keep and not scored:
                break
            idx = list(range(start, min(start + self.batch_size, n)))
            h = inputs[start : start + len(idx)].to(self.device)
            mask = self._mask(idx, h.shape[1], text)
            if collector is not None:
                collector.new_batch(mask)
            out = self._forward(block, j, cap, h, idx)
            if keep:
                out_buf[start : start + len(idx)] = out.to(out_buf.device, out_buf.dtype)
            if ref is not None and scored:
                r = ref[start : start + len(idx)].to(self.device)
                se, cnt = _sq_err(out, r, mask)
                total += float(se)
                count += cnt
        return (total / count if count else math.nan), out_buf

    def _tune(self, i, block, j, cap, wrappers, clips, q_in, fp_out, text, rng, rtn_loss):
        bp = self.plan.blocks[i]
        scratch = Scratch()
        states = {
            n: TunedLinear(n, w.linear.weight, self.spec, clips[n], scratch) for n, w in wrappers.items()
        }
        for g in _groups(wrappers):
            g.use_states([states[_name_of(wrappers, m)] for m in g.members])
        sampler = _IndexSampler(q_in.shape[0], self.batch_size, rng)
        lr0 = self.recipe.learning_rate
        best_loss = math.inf
        for it in range(self.iters):
            last = it + 1 == self.iters
            with torch.set_grad_enabled(not last):  # the step after the last forward is never evaluated
                idx = sampler.next()
                h = q_in[idx].to(self.device)
                ref = fp_out[idx].to(self.device)
                mask = self._mask(idx, h.shape[1], text)
                out = self._forward(block, j, cap, h, idx)
                se, cnt = _sq_err(out, ref, mask)
                loss = se / cnt
                value = float(loss.detach())
                if value < best_loss:  # the codes of this forward are the best so far (on its batch)
                    best_loss = value
                    for s in states.values():
                        s.keep_best()
                if last:
                    break
                lr = lr0 * (1.0 - it / self.iters)
                for s in states.values():
                    s.lr = lr
                (loss * LOSS_SCALE).backward()  # steps V, alpha, beta (SignSGD inside the backward)
                if (it + 1) % PROGRESS_EVERY == 0:
                    self._emit(
                        ProgressEvent(
                            i,
                            len(self.plan.blocks),
                            bp.name,
                            iteration=it + 1,
                            iters=self.iters,
                            rtn_loss=rtn_loss,
                            loss=value,
                        )
                    )
        self.grad_kinds.update(s.grad_kind for s in states.values() if s.grad_kind)
        return {n: s.int_weight() for n, s in states.items()}


def _release_memory(device: torch.device) -> None:
    """Free what the block left behind, so that peak memory does not creep up with depth."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap pages otherwise
        except (OSError, AttributeError):
            pass


def _groups(wrappers: dict[str, QLinear]) -> list[LinearGroup]:
    seen: dict[int, LinearGroup] = {}
    for w in wrappers.values():
        seen.setdefault(id(w.group), w.group)
    return list(seen.values())


def _name_of(wrappers: dict[str, QLinear], member: QLinear) -> str:
    return next(n for n, w in wrappers.items() if w is member)


class _SquaredError(torch.autograd.Function):
    """sum((out - ref)^2 * mask) in fp32, with the difference kept for the backward: two passes each way
    instead of the eight of the plain expression and its autograd."""

    @staticmethod
    def forward(ctx, out, ref, mask):
        d = out.to(torch.float32, copy=True).sub_(ref)  # a copy even when out is fp32: out stays as it is
        if mask is not None:
            d.mul_(mask.to(d.device, d.dtype).unsqueeze(-1))  # masked positions: no error, no gradient
        ctx.save_for_backward(d)
        ctx.dtype = out.dtype
        flat = d.view(-1)
        return torch.dot(flat, flat)

    @staticmethod
    def backward(ctx, grad):
        (d,) = ctx.saved_tensors
        return (d * (2 * grad)).to(ctx.dtype), None, None


def _sq_err(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """(sum of squared errors over the valid positions, number of valid elements)."""
    count = int(mask.sum()) * out.shape[-1] if mask is not None else out.numel()
    return _SquaredError.apply(out, ref, mask), max(count, 1)


def _keep(w: IntWeight) -> PackedWeight | IntWeight:
    """What the run holds of a finished linear: 4-bit codes packed two per byte."""
    return PackedWeight.pack(w) if PackedWeight.fits(w) else w


def _codes(w: PackedWeight | IntWeight) -> IntWeight:
    return w.unpack() if isinstance(w, PackedWeight) else w


def _cpu(w: IntWeight) -> IntWeight:
    return IntWeight(w.q.cpu(), w.scale.cpu(), w.zero.cpu(), w.group_size, w.bits)


def _swap(root: nn.Module, name: str, new: nn.Module):
    """Replace submodule ``name`` of ``root`` by ``new``; returns the undo."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, new)
    return lambda: setattr(parent, child, old)


def _dispatch(block: nn.Module, devices: list[torch.device], home: torch.device):
    """Spread a block's direct children over ``devices`` by parameter bytes with accelerate (untested)."""
    from accelerate import dispatch_model
    from accelerate.hooks import remove_hook_from_module

    children = list(block.named_children())
    sizes = [sum(p.numel() * p.element_size() for p in c.parameters()) for _, c in children]
    total = max(sum(sizes), 1)
    device_map, acc = {}, 0
    for (name, _), size in zip(children, sizes, strict=True):
        k = min(int(acc * len(devices) / total), len(devices) - 1)
        device_map[name] = str(devices[k])
        acc += size
    for name, _ in block.named_parameters(recurse=False):
        device_map[name] = str(devices[0])
    dispatch_model(block, device_map=device_map, main_device=str(devices[0]))

    def undo():
        remove_hook_from_module(block, recurse=True)
        block.to(home)

    return undo
