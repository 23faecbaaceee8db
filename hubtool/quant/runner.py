"""The block runner: a model's blocks, one at a time, over the calibration data, whatever the per-block algorithm.

:meth:`BlockRunner.run` takes the per-block algorithm as a function of a :class:`BlockJob` and, for each
chain of blocks (consecutive blocks of one ModuleList: the language model's decoder layers; a vision
encoder's too with ``--quantize-vision``):

1. captures the blocks' arguments and the chain's inputs with a calibration forward (:mod:`.capture`);
   a chain after quantized blocks gets its quantized-path inputs from a second forward through their codes,
   a resumed chain gets both from the work directory;
2. for each block: puts it on the device (or spreads it over ``--device-map`` with accelerate), runs it
   with the CPU's tuning attention and fused ops, calls the algorithm, takes the block back and frees
   the memory it left;
3. keeps the block's codes (two per byte), saves them with the next block's inputs to the work directory
   and commits (:mod:`.workdir`), and reports progress.

A :class:`BlockJob` is what the algorithm gets: the block and its plan, its inputs on both paths
(:class:`Acts`), and how to run it over the samples (``forward`` one batch, ``outputs`` of every sample,
``loss`` against a reference, the valid-token ``mask``) and report progress.

Memory: one block is on the device at a time; the activations stay on the CPU in the model dtype (two
tensors of nsamples x seqlen x hidden: the algorithm takes its inputs out of the job and writes each path's
outputs over its inputs), so memory does not grow with depth beyond the finished codes. glibc's heap is
trimmed before every forward and after every block (:func:`hubtool.core.memory.trim`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.intweight import IntWeight, PackedWeight
from ..core.lazy import held
from ..core.memory import trim
from ..record import BlockLoss
from .attention import cpu_tuning_attention
from .capture import Capture, capture
from .fused import cpu_fused_ops
from .layers import BlockPlan, QuantPlan
from .qlinear import running_codes
from .result import ProgressEvent, ProgressFn, QuantResult
from .workdir import WorkDir

log = logging.getLogger(__name__)


@dataclass
class Acts:
    """One block's inputs (or outputs) for every calibration sample, on the CPU in the model dtype."""

    fp: torch.Tensor | None  # the 16-bit path: the 16-bit model's hidden states
    q: torch.Tensor | None  # the quantized path: the outputs of the blocks already quantized

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Both tensors, leaving this empty (so that the holder does not keep them alive)."""
        fp, q = self.fp, self.q
        self.fp = self.q = None
        return fp, q


@dataclass
class BlockDone:
    """What the per-block algorithm returns."""

    codes: dict[str, IntWeight]  # by linear name relative to the block, in the plan's order
    loss: BlockLoss
    outputs: Acts | None  # the next block's inputs (None after the chain's last block)
    iters: int = 0  # tuning iterations run
    weight_grad: set[str] = field(default_factory=set)  # precisions of dL/dW seen while tuning


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


def squared_error(
    out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, int]:
    """(sum of squared errors over the valid positions, number of valid elements)."""
    count = int(mask.sum()) * out.shape[-1] if mask is not None else out.numel()
    return _SquaredError.apply(out, ref, mask), max(count, 1)


class BlockJob:
    """One block to quantize, and how to run it over the calibration samples."""

    def __init__(self, runner: BlockRunner, index: int, block: nn.Module, cap: Capture, j: int, inputs: Acts):
        self.index = index  # in the plan
        self.plan: BlockPlan = runner.plan.blocks[index]
        self.block = block
        self.inputs = inputs  # the algorithm takes them (Acts.take) to free them as early as it can
        self.device = runner.device
        self.batch_size = runner.batch_size
        self.last = index == runner.chain_end(index)  # the chain's last block: no outputs needed
        self.masked = self.plan.tower == "text"  # vision blocks see patches: no padding to mask
        self._runner = runner
        self._capture, self._j = cap, j

    def forward(self, h: torch.Tensor, idx: list[int]) -> torch.Tensor:
        """The block's output for hidden states ``h`` of samples ``idx`` (on the device)."""
        trim()  # the heap pages the previous forward (and backward) freed go back before this one touches more
        args, kwargs = self._capture.arguments(self._j, idx, self.device)
        with self._runner.autocast():
            return self._capture.call(self.block, h, args, kwargs)

    def mask(self, idx: list[int], length: int) -> torch.Tensor | None:
        """The valid-token mask (B, L) of samples ``idx`` on the device; None when every position counts."""
        mask = self._runner.mask
        if not self.masked or mask is None or mask.shape[1] != length or bool(mask[idx].all()):
            return None
        return mask[idx].to(self.device)

    def outputs(
        self,
        inputs: torch.Tensor,
        before_batch: Callable[[torch.Tensor | None], None] | None = None,
        into: torch.Tensor | None = None,
        head: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The block's outputs for every sample; ``before_batch(mask)`` is called before each batch's forward.

        ``into`` receives them instead of a new tensor; it may be ``inputs`` itself (a batch's rows are
        overwritten after its forward, and no other batch reads them). ``head``: the outputs of the first
        samples, computed already (:meth:`loss` with ``keep_outputs``): copied in, not run again.
        """
        out = torch.empty_like(inputs) if into is None else into
        first = 0 if head is None else head.shape[0]
        self._run(inputs, None, 0, out=out, first=first, before_batch=before_batch)
        if head is not None:
            out[:first] = head.to(out.device, out.dtype)
        return out

    def loss(
        self, inputs: torch.Tensor, ref: torch.Tensor, batches: int, keep_outputs: bool = False
    ) -> tuple[float, torch.Tensor | None]:
        """(mean squared error against ``ref`` over the valid positions of the first ``batches`` batches,
        with ``keep_outputs`` those batches' outputs (for :meth:`outputs`' ``head``), else None). Only those
        batches run."""
        n = min(inputs.shape[0], batches * self.batch_size)
        out = torch.empty_like(inputs[:n]) if keep_outputs else None
        return self._run(inputs, ref, batches, out=out), out

    def report(self, iteration: int, iters: int, rtn_loss: float, loss: float) -> None:
        """Progress within the block (tuning iterations)."""
        self._runner.emit(
            ProgressEvent(
                self.index,
                len(self._runner.plan.blocks),
                self.plan.name,
                iteration=iteration,
                iters=iters,
                rtn_loss=rtn_loss,
                loss=loss,
            )
        )

    @torch.no_grad()
    def _run(self, inputs, ref, batches, out=None, first=0, before_batch=None) -> float:
        """Run the samples from ``first`` on, batch by batch: the mean squared error against ``ref`` over the
        first ``batches`` batches, the outputs written into ``out`` (rows from ``first``) while it has room."""
        total, count = 0.0, 0
        n = inputs.shape[0]
        for b, start in enumerate(range(first, n, self.batch_size)):
            idx = list(range(start, min(start + self.batch_size, n)))
            scored = ref is not None and b < batches
            keep = out is not None and idx[-1] < out.shape[0]
            if not keep and not scored:
                break
            h = inputs[start : start + len(idx)].to(self.device)
            mask = self.mask(idx, h.shape[1])
            if before_batch is not None:
                before_batch(mask)
            y = self.forward(h, idx)
            del h  # a view of ``inputs``, which may be ``out``: written below
            if scored:
                se, cnt = squared_error(y, ref[start : start + len(idx)].to(self.device), mask)
                total += float(se)
                count += cnt
            if keep:
                out[start : start + len(idx)] = y.to(out.device, out.dtype)
            del y
        return total / count if count else math.nan


BlockFn = Callable[[BlockJob], BlockDone]


class BlockRunner:
    """Runs a per-block algorithm over every block of a plan: capture, placement, memory, resume, progress."""

    def __init__(
        self,
        model: nn.Module,
        plan: QuantPlan,
        calib: Any,
        *,
        batch_size: int,
        device: str = "cpu",
        device_map: str | None = None,
        progress: ProgressFn | None = None,
    ):
        self.model = model
        self.plan = plan
        self.calib = calib
        self.batch_size = batch_size
        self.devices = _parse_device_map(device_map)
        self.device = self.devices[0] if self.devices else torch.device(device)
        self.progress = progress
        self.weights: dict[str, PackedWeight | IntWeight] = {}  # finished linears, 4-bit codes packed
        self.saved: list[str] = []  # finished linears whose codes live in the work directory only
        self.losses: list[BlockLoss] = []
        self.weight_grad: set[str] = set()
        mask = (
            torch.cat([s["attention_mask"] for s in calib.samples])
            if "attention_mask" in calib.samples[0]
            else None
        )
        self.mask = mask.bool() if mask is not None else None  # (samples, seqlen) valid tokens
        self.chains = _chains(plan)

    def run(self, quantize_block: BlockFn, work: WorkDir | None = None, resume: bool = False) -> QuantResult:
        """Quantize every block of the plan with ``quantize_block``; with ``work``, save (and resume) there."""
        # the objects alive now (the model, transformers) are left out of the per-block garbage
        # collections: a full collection over them costs 0.2 s, for nothing
        gc.freeze()
        training = self.model.training
        self.model.eval()  # no dropout while block outputs are compared
        try:
            return self._run(quantize_block, work, resume)
        finally:
            self.model.train(training)
            gc.unfreeze()

    def _run(self, quantize_block: BlockFn, work: WorkDir | None, resume: bool) -> QuantResult:
        done = work.start(resume) if work else 0
        total = len(self.plan.blocks)
        for i in range(done):
            loss, names = work.block_info(i)
            self.saved.extend(names)
            self.losses.append(loss)
            self.emit(
                ProgressEvent(
                    i, total, self.plan.blocks[i].name, done=True, rtn_loss=loss.rtn, loss=loss.tuned
                )
            )
        if done:
            log.info("resuming after %d finished blocks", done)
        for chain in self.chains:
            pending = [i for i in chain if i >= done]
            if not pending:
                continue
            blocks = [self.model.get_submodule(self.plan.blocks[i].name) for i in chain]
            cap, acts = self._chain_inputs(chain, pending[0], blocks, work)
            for i in pending:
                j = chain.index(i)
                job = BlockJob(self, i, blocks[j], cap, j, acts)
                with self._on_device(blocks[j]):
                    result = quantize_block(job)
                del job
                acts = result.outputs
                self._finish(i, result, work)
                del result  # its codes are kept packed now
        kinds = ",".join(sorted(self.weight_grad)) or None
        if work:  # the codes stay on disk; the exports read them block by block
            return QuantResult(weights=work.codes(), block_losses=self.losses, weight_grad=kinds)
        weights = {}
        for n in list(self.weights):  # unpacked one by one, so the codes are never held twice
            weights[n] = _unpacked(self.weights.pop(n))
        return QuantResult(weights=weights, block_losses=self.losses, weight_grad=kinds)

    def _chain_inputs(
        self, chain: list[int], first: int, blocks: list[nn.Module], work: WorkDir | None
    ) -> tuple[Capture, Acts]:
        """The chain's captured arguments and the inputs of its block ``first`` on both paths."""
        at_start = first == chain[0]
        cap, hidden = capture(self.model, blocks, self.calib, self.batch_size, keep_hidden=at_start)
        if not at_start:
            return cap, Acts(*work.load_inputs(first))
        acts = Acts(hidden, hidden)
        earlier = self._earlier_weights(chain[0], work)
        if earlier:  # the quantized path enters this chain through the blocks already quantized
            # (a streamed model holds those blocks meanwhile: their norms and biases run as they are)
            before = [self.model.get_submodule(b.name) for b in self.plan.blocks[: chain[0]]]
            with held(self.model, *before), running_codes(self.model, earlier):
                acts.q = capture(self.model, blocks[:1], self.calib, self.batch_size, keep_hidden=True)[1]
        return cap, acts

    def _finish(self, i: int, result: BlockDone, work: WorkDir | None) -> None:
        """Keep block i's codes, save them (and the next block's inputs) and report the block done."""
        name = self.plan.blocks[i].name
        codes = {f"{name}.{n}": _on_cpu(w) for n, w in result.codes.items()}
        if work:
            self.saved.extend(codes)
        else:
            self.weights.update({n: _packed(w) for n, w in codes.items()})
        self.losses.append(result.loss)
        self.weight_grad |= result.weight_grad
        if work:
            work.save_block(i, result.loss, codes)
            if result.outputs is not None:
                work.save_inputs(i + 1, result.outputs.fp, result.outputs.q)
            work.commit(i + 1)
        self.emit(
            ProgressEvent(
                i,
                len(self.plan.blocks),
                name,
                done=True,
                iters=result.iters,
                iteration=result.iters,
                rtn_loss=result.loss.rtn,
                loss=result.loss.tuned,
            )
        )

    def chain_end(self, i: int) -> int:
        """The last block of block i's chain."""
        return next(c[-1] for c in self.chains if i in c)

    def emit(self, ev: ProgressEvent) -> None:
        """Report progress, if anyone listens."""
        if self.progress:
            self.progress(ev)

    def autocast(self):
        """bf16 autocast on CUDA (the block's matmuls), nothing elsewhere."""
        if self.device.type == "cuda":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _earlier_weights(self, first: int, work: WorkDir | None) -> dict[str, IntWeight]:
        names = [n for b in self.plan.blocks[:first] for n in b.full_names()]
        if work:
            codes = work.codes()
            return {n: codes[n] for n in names if n in self.saved}
        return {n: _unpacked(self.weights[n]) for n in names if n in self.weights}

    @contextlib.contextmanager
    def _on_device(self, block: nn.Module) -> Iterator[None]:
        """While in this context the block is on the device (or spread over --device-map), its parameters
        frozen, with the CPU's tuning attention and fused ops; after it, back home and its memory freed."""
        with (
            held(self.model, block),
            cpu_tuning_attention(block, self.device),
            cpu_fused_ops(block, self.device),
        ):
            undo_placement = self._place(block)
            frozen = [(p, p.requires_grad) for p in block.parameters()]
            for p, _ in frozen:
                p.requires_grad_(False)
            try:
                yield
            finally:
                for p, flag in frozen:
                    p.requires_grad_(flag)
                undo_placement()
                _release_memory(self.device)

    def _place(self, block: nn.Module) -> Callable[[], None]:
        """Put the block on the device (or spread it over --device-map); returns the undo."""
        home = next(block.parameters()).device
        if len(self.devices) > 1:
            return _dispatch(block, self.devices, home)
        if home != self.device:
            block.to(self.device)
            return lambda: block.to(home)
        return lambda: None


def _chains(plan: QuantPlan) -> list[list[int]]:
    """Block indices grouped into chains of consecutive blocks from the same ModuleList."""
    chains: list[list[int]] = []
    prev = None
    for i, b in enumerate(plan.blocks):
        parent = b.name.rsplit(".", 1)[0]
        if parent != prev:
            chains.append([])
            prev = parent
        chains[-1].append(i)
    return chains


def _parse_device_map(device_map: str | None) -> list[torch.device]:
    """'auto' (every GPU) or a comma-separated list of devices ('cuda:0,cuda:1'; 'cpu,cpu' runs the same path on the CPU)."""
    if not device_map:
        return []
    if device_map == "auto":
        return [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    return [torch.device(d.strip()) for d in device_map.split(",") if d.strip()]


def _dispatch(block: nn.Module, devices: list[torch.device], home: torch.device) -> Callable[[], None]:
    """Spread a block's direct children over ``devices`` by parameter bytes with accelerate's hooks; returns
    the undo (hooks removed, the block back home, as it was)."""
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
    own_forward = {m for m in block.modules() if "forward" in m.__dict__}
    # force_hooks: the same hooks when every child lands on one device (e.g. "cpu,cpu")
    dispatch_model(block, device_map=device_map, main_device=str(devices[0]), force_hooks=True)

    def undo():
        remove_hook_from_module(block, recurse=True)
        for m in block.modules():  # accelerate leaves each module's bound forward behind
            if m not in own_forward:
                m.__dict__.pop("forward", None)
        block.__dict__.pop("hf_device_map", None)
        block.to(home)

    return undo


def _release_memory(device: torch.device) -> None:
    """Free what the block left behind, so that peak memory does not creep up with depth."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    trim()  # glibc keeps freed heap pages otherwise


def _packed(w: IntWeight) -> PackedWeight | IntWeight:
    """What the run holds of a finished linear: 4-bit codes packed two per byte."""
    return PackedWeight.pack(w) if PackedWeight.fits(w) else w


def _unpacked(w: PackedWeight | IntWeight) -> IntWeight:
    return w.unpack() if isinstance(w, PackedWeight) else w


def _on_cpu(w: IntWeight) -> IntWeight:
    return w.cpu()
