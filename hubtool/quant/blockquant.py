"""The per-block algorithm of ``--method opt-rtn`` and ``--method signround``: :func:`quantize_block`.

It gets a :class:`.runner.BlockJob` (the block on its device, its inputs on the 16-bit and the quantized
path, how to run it over the calibration samples) and returns the block's codes, its losses and the
next block's inputs. The 16-bit path feeds each block the 16-bit model's hidden states; the quantized
path feeds it the outputs of the blocks already quantized, so each block is tuned to undo what the
earlier ones lost. Block losses are measured on the first calibration batch (``LOSS_BATCHES``): RTN's
loss is then one batch's forward, not another pass over every sample.
"""

from __future__ import annotations

import logging
import random

import torch

from ..core.intweight import IntWeight
from ..core.spec import QuantSpec
from ..record import BlockLoss
from .optrtn import HessianCollector, quantize_clipped, search_clip
from .qlinear import LinearGroup, quantized_linears, use_codes
from .rtn import quantize_rtn
from .runner import Acts, BlockDone, BlockJob
from .spec import Recipe
from .tuning import tune_block

log = logging.getLogger(__name__)

LOSS_BATCHES = 1  # calibration batches the block losses (RTN's and the final one) are measured on


def quantize_block(job: BlockJob, spec: QuantSpec, method: str, recipe: Recipe) -> BlockDone:
    """Quantize one block's planned linears with opt-rtn or SignRound, in six steps:

    1. the 16-bit block on the 16-bit inputs: the reference outputs (the next block's 16-bit inputs),
       while hooks accumulate ``X^T X`` of every linear's input;
    2. RTN's codes and their loss on the quantized path;
    3. per group, the clipping that minimizes each linear's output error on ``X^T X`` (:mod:`.optrtn`):
       opt-rtn's codes;
    4. ``signround``: V, alpha, beta tuned from there with SignSGD, the best iterate kept (:mod:`.tuning`);
    5. the final codes on the quantized path: their loss;
    6. if that loss is above RTN's, RTN's codes (never worse than RTN on the calibration batch); then the
       next block's quantized-path inputs.

    Memory: the outputs of each path are written over that path's inputs (a batch's rows once its forward
    is done), and RTN's codes are not kept (computed again where step 6 needs them): besides the block, its
    dequantized codes and one batch's forward, two activation tensors live at a time.
    """
    name = job.plan.name
    iters = recipe.iters if method == "signround" else 0
    seed = recipe.seed * 1_000_003 + job.index  # the block's batch order depends on (seed, block) only
    torch.manual_seed(seed)
    fp_in, q_in = job.inputs.take()
    weight_grad: set[str] = set()
    with quantized_linears(job.block, job.plan.linears) as linears:
        # 1. reference outputs and X^T X (written over the 16-bit inputs, unless the two paths share them)
        into = None if fp_in.untyped_storage().data_ptr() == q_in.untyped_storage().data_ptr() else fp_in
        with HessianCollector(linears, spec.group_size) as collector:
            fp_out = job.outputs(fp_in, before_batch=collector.new_batch, into=into)
        del fp_in, into
        for names in collector.same_input.values():  # linears reading the same input: one matmul
            LinearGroup([linears[n] for n in names])

        def rtn_codes() -> dict[str, IntWeight]:  # not kept: computed again in step 6 if needed (same bits)
            return {n: quantize_rtn(q.linear.weight.detach(), spec) for n, q in linears.items()}

        # 2. RTN
        use_codes(linears, rtn_codes())
        rtn_loss, _ = job.loss(q_in, fp_out, LOSS_BATCHES)
        # 3. the clipping search
        clips = {n: search_clip(q.linear.weight, collector.h.get(n), spec) for n, q in linears.items()}
        # 4. SignRound
        if iters > 0:
            lr0 = recipe.learning_rate
            codes, weight_grad = tune_block(
                job, linears, clips, q_in, fp_out, spec, iters, lr0, random.Random(seed), rtn_loss
            )
        else:
            codes = {n: quantize_clipped(q.linear.weight, spec, clips[n]) for n, q in linears.items()}
        # 5. the final codes' loss on the quantized path (the first batches: their outputs kept)
        use_codes(linears, codes)
        loss, head = job.loss(q_in, fp_out, LOSS_BATCHES, keep_outputs=not job.last)
        # 6. keep RTN's codes where the final ones did worse
        if not loss <= rtn_loss:
            log.info("%s: tuned loss %.4g above RTN's %.4g: keeping RTN", name, loss, rtn_loss)
            codes, loss, head = rtn_codes(), rtn_loss, None
            if not job.last:
                use_codes(linears, codes)
        # the next block's quantized-path inputs, written over this block's (read batch by batch first)
        q_out = None if job.last else job.outputs(q_in, into=q_in, head=head)
        del q_in, head
    log.info("%s: loss RTN %.4g -> %s %.4g", name, rtn_loss, method, loss)
    return BlockDone(
        codes=codes,
        loss=BlockLoss(name, float(rtn_loss), float(loss)),
        outputs=None if job.last else Acts(fp_out, q_out),
        iters=iters,
        weight_grad=weight_grad,
    )
