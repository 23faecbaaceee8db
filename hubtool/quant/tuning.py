"""SignRound's loop over one block: SignSGD on V, alpha and beta from the clipping search's start.

One iteration (:func:`tune_block`): a shuffled batch of samples; the block's forward on the quantized
path with the tuning states' fake weights; the MSE against the 16-bit block's outputs over the valid
positions; the codes kept if that loss is the best so far; the backward, inside which
:func:`.signround.sign_sgd` takes the sign-gradient step at learning rate ``lr0 * (1 - it / iters)``.
The last iteration only evaluates (its step would never be seen). The batch order depends only on the
seed and the block, so a resumed run tunes each block as an uninterrupted one.
"""

from __future__ import annotations

import math
import random

import torch

from ..core.intweight import IntWeight
from ..core.spec import QuantSpec
from .qlinear import QLinear, group_states
from .runner import BlockJob, squared_error
from .signround import Scratch, TunedLinear, sign_sgd

LOSS_SCALE = 1000.0  # as auto-round: the MSE is scaled before backward
PROGRESS_EVERY = 10  # iterations between progress events


class IndexSampler:
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


def tune_block(
    job: BlockJob,
    linears: dict[str, QLinear],
    clips: dict[str, torch.Tensor],
    q_in: torch.Tensor,
    fp_out: torch.Tensor,
    spec: QuantSpec,
    iters: int,
    lr0: float,
    rng: random.Random,
    rtn_loss: float,
) -> tuple[dict[str, IntWeight], set[str]]:
    """SignRound on the block's linears from clipping ``clips``: (the best iterate's codes, the precisions of
    dL/dW seen). ``q_in`` are the quantized-path inputs, ``fp_out`` the 16-bit block's outputs."""
    scratch = Scratch()
    states = {n: TunedLinear(n, q.linear.weight, spec, clips[n], scratch) for n, q in linears.items()}
    group_states(linears, states)
    sampler = IndexSampler(q_in.shape[0], job.batch_size, rng)
    best_loss = math.inf
    for it in range(iters):
        last = it + 1 == iters
        with torch.set_grad_enabled(not last):  # the step after the last forward is never evaluated
            idx = sampler.next()
            h = q_in[idx].to(job.device)
            out = job.forward(h, idx)
            se, count = squared_error(out, fp_out[idx].to(job.device), job.mask(idx, h.shape[1]))
            loss = se / count
            value = float(loss.detach())
            if value < best_loss:  # the codes of this forward are the best so far (on its batch)
                best_loss = value
                for s in states.values():
                    s.keep_best()
            if last:
                break
            with sign_sgd(states.values(), lr0 * (1.0 - it / iters)):
                (loss * LOSS_SCALE).backward()  # V, alpha, beta step as their gradients come
        if (it + 1) % PROGRESS_EVERY == 0:
            job.report(it + 1, iters, rtn_loss, value)
    weight_grad = {s.grad_kind for s in states.values() if s.grad_kind}
    return {n: s.int_weight() for n, s in states.items()}, weight_grad
