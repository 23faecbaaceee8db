"""Attention for block tuning on the CPU: eager attention's arithmetic with a hand-written backward.

SignRound runs each block forward and backward about a hundred times. On the CPU, torch's SDPA
(a flash kernel) and transformers' eager attention (several passes over the (B, H, L, S) scores) spend
10-20% of that time in attention. This computes eager attention's function with SDPA's precision
(fp32 logits and softmax, bf16 probabilities times bf16 values, fp32 accumulation):

* query heads that share a key/value head form one batched matmul (no ``repeat_kv`` copies);
* with a causal mask the queries run in up to eight blocks, each against only the keys it can see;
* the backward is written out (``dS = P * (dP - rowsum(dP * P))``) and reuses the saved probabilities;
* the softmax (scale, mask, softmax, cast) and its backward are one C++ pass each
  (``hubtool::masked_softmax`` / ``softmax_bwd`` in ``kernels/cpu/block_ops.cpp``), the torch code otherwise.

It is used only where it computes the same function as the model's own: no dropout, no logit
soft-capping, no attention sinks or position bias, and a mask it understands (additive, boolean, or
none with a causal module). Anything else goes to the model's own implementation, and nothing
changes on other devices.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

import torch
from torch import nn

NAME = "hubtool_tune"
_ORIGINAL: dict[int, str] = {}  # id(config) -> the implementation it had before tuning
_CHANGES_RESULT = ("softcap", "s_aux", "sinks", "position_bias", "head_mask")  # any of these set: fall back
_MASK_MIN = torch.finfo(torch.float32).min
_MASKED = -1e30  # an additive mask at or below this gives a probability of exactly 0 in fp32


PART_ROWS = 64  # the causal skip cuts the queries into blocks of at least this many positions
MAX_PARTS = 8


def _kernels(t: torch.Tensor) -> bool:
    """Whether the softmax runs as hubtool's C++ kernels (CPU, library built)."""
    from ..kernels import cpu

    return cpu.runs_on(t.device)


def _parts(mask: torch.Tensor | None, lq: int, s: int) -> list[tuple[int, int, int]]:
    """(first query, end, keys seen) blocks of queries: where a mask hides every key after a block's last
    position from the whole block (causal), that block skips them (only fully masked rows change: padding,
    never scored)."""
    whole = [(0, lq, s)]
    if mask is None or lq != s or lq < 2 * PART_ROWS or mask.shape[-3] != lq:  # not per query: no skip
        return whole
    n = min(MAX_PARTS, lq // PART_ROWS)
    bounds = [lq * i // n for i in range(n + 1)]
    parts = [
        (r0, r1, r1 if not bool((mask[..., r0:r1, :, r1:] > _MASKED).any()) else s)
        for r0, r1 in zip(bounds, bounds[1:], strict=False)
    ]
    return whole if all(kc == s for *_, kc in parts) else parts


class _GroupedAttention(torch.autograd.Function):
    """softmax(Q K^T * scale + mask) V with query heads grouped by their key/value head.

    Query rows are ordered (position, head) per key/value head, so that a block of positions is a
    contiguous slice (the causal skip in :func:`_parts`) and, with one key/value head, the output is
    already in the (B, L, H, D) layout the model wants.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        b, h, lq, d = q.shape
        kvh, s = k.shape[1], k.shape[2]
        g = h // kvh
        qg = q.transpose(1, 2).reshape(b, lq, kvh, g, d).transpose(1, 2).reshape(b * kvh, lq * g, d)
        kg = k.reshape(b * kvh, s, k.shape[3])
        vg = v.reshape(b * kvh, s, v.shape[3])
        parts = _parts(mask, lq, s)
        probs, outs = [], []
        # fp32 logits (SDPA's precision: bf16 logits would be off by up to |logit| / 256)
        qf, kf = qg.float(), kg.float()
        fused = _kernels(q)
        for r0, r1, kc in parts:
            sc = torch.bmm(qf[:, r0 * g : r1 * g], kf[:, :kc].transpose(1, 2))
            part_mask = None if mask is None else mask[..., r0:r1, :, :kc]
            if fused:  # scale, mask, softmax and the cast in one pass
                m3 = None if part_mask is None else part_mask[:, 0, :, 0].expand(-1, r1 - r0, kc)
                p = torch.ops.hubtool.masked_softmax(sc, m3, scale, kvh, g, q.dtype)
            else:
                sc = sc.view(b, kvh, r1 - r0, g, kc).mul_(scale)
                if part_mask is not None:
                    sc.add_(part_mask)
                p = torch.softmax(sc, dim=-1).to(q.dtype).view(b * kvh, (r1 - r0) * g, kc)
            probs.append(p)
            outs.append(torch.bmm(p, vg[:, :kc]))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # (b*kvh, lq*g, dv)
        ctx.save_for_backward(qg, kg, vg, *probs)
        ctx.scale, ctx.dims, ctx.parts, ctx.fused = scale, (b, h, lq, kvh), parts, fused
        return out.view(b, kvh, lq, g, -1).transpose(1, 2).reshape(b, lq, h, -1)

    @staticmethod
    def backward(ctx, grad):
        qg, kg, vg, *probs = ctx.saved_tensors
        b, h, lq, kvh = ctx.dims
        g = h // kvh
        dout = grad.reshape(b, lq, kvh, g, -1).transpose(1, 2).reshape(b * kvh, lq * g, -1).to(vg.dtype)
        dq = torch.empty_like(qg)
        whole = len(ctx.parts) == 1
        dk = None if whole else torch.zeros(kg.shape, dtype=torch.float32, device=kg.device)
        dv = None if whole else torch.zeros(vg.shape, dtype=torch.float32, device=vg.device)
        for (r0, r1, kc), p in zip(ctx.parts, probs, strict=True):
            rows = slice(r0 * g, r1 * g)
            do = dout[:, rows]
            dp = torch.bmm(do, vg[:, :kc].transpose(1, 2))
            if ctx.fused:
                ds = torch.ops.hubtool.softmax_bwd(dp, p, ctx.scale)
            else:
                dp, pf = dp.float(), p.float()
                ds = dp.sub_((dp * pf).sum(-1, keepdim=True)).mul_(pf).mul_(ctx.scale).to(qg.dtype)
            dq[:, rows] = torch.bmm(ds, kg[:, :kc])
            dk_p = torch.bmm(ds.transpose(1, 2), qg[:, rows])
            dv_p = torch.bmm(p.transpose(1, 2), do)
            if whole:
                dk, dv = dk_p, dv_p
            else:
                dk[:, :kc] += dk_p
                dv[:, :kc] += dv_p
        dq = dq.view(b, kvh, lq, g, -1).transpose(2, 3).reshape(b, h, lq, -1)
        dk = dk.to(kg.dtype).view(b, kvh, kg.shape[1], -1)
        return dq, dk, dv.to(vg.dtype).view(b, kvh, vg.shape[1], -1), None, None


def _additive_mask(
    mask: torch.Tensor | None, module: nn.Module, lq: int, s: int, device
) -> torch.Tensor | None:
    """The mask as an fp32 additive term broadcastable to (B, KV, Lq, G, S); None: no masking."""
    if mask is None:
        if lq == 1 or not getattr(module, "is_causal", True):
            return None
        mask = torch.ones(lq, s, dtype=torch.bool, device=device).tril(s - lq)
    if mask.dtype == torch.bool:
        add = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        add.masked_fill_(~mask, _MASK_MIN)
    else:
        add = mask.float().clamp(min=_MASK_MIN)
    add = add[..., :s]
    while add.dim() < 4:
        add = add.unsqueeze(0)
    return add.unsqueeze(3)  # (B|1, 1 -> KV heads, Lq, 1 -> heads of a group, S)


def _fallback(module: nn.Module) -> Callable:
    """The model's own implementation (the one its config named before tuning)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = _ORIGINAL.get(id(module.config), "sdpa")
    if name == "eager" or name not in ALL_ATTENTION_FUNCTIONS:
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is not None:
            return eager
        name = "sdpa"
    return ALL_ATTENTION_FUNCTIONS[name]


def _supported(query, key, attention_mask, dropout, kwargs) -> bool:
    """Whether eager attention here is exactly the masked softmax(Q K^T * scale) V computed below."""
    if dropout or query.shape[1] % key.shape[1]:
        return False
    if any(kwargs.get(k) is not None for k in _CHANGES_RESULT) or kwargs.get("is_causal") is False:
        return False
    if attention_mask is None:
        window = kwargs.get("sliding_window")
        return not window or key.shape[2] <= window
    return attention_mask.dim() < 4 or attention_mask.shape[1] == 1


def tuning_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention interface: eager attention's result, computed faster on the CPU."""
    if not _supported(query, key, attention_mask, dropout, kwargs):
        return _fallback(module)(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    mask = _additive_mask(attention_mask, module, query.shape[2], key.shape[2], query.device)
    return _GroupedAttention.apply(query, key, value, mask, float(scale)), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, tuning_attention)


@contextlib.contextmanager
def cpu_tuning_attention(block: nn.Module, device: torch.device) -> Iterator[None]:
    """While in this context, the block's attention runs :func:`tuning_attention` (CPU only)."""
    if device.type != "cpu":
        yield
        return
    configs = {}
    for m in block.modules():
        cfg = getattr(m, "config", None)
        impl = getattr(cfg, "_attn_implementation", None)
        if impl in ("sdpa", "eager") and id(cfg) not in configs:
            configs[id(cfg)] = (cfg, impl)
    if configs:
        _register()
    try:
        for key, (cfg, impl) in configs.items():
            _ORIGINAL[key] = impl
            cfg._attn_implementation = NAME
        yield
    finally:
        for key, (cfg, impl) in configs.items():
            cfg._attn_implementation = impl
            _ORIGINAL.pop(key, None)
