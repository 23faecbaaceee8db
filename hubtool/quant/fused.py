"""Fused elementwise ops for block tuning on the CPU: the gated MLP's activation and RMSNorm.

A gated MLP (Llama, Gemma, Qwen, Mistral: ``down(act(gate(x)) * up(x))``) spends, per tuning
iteration, an activation, a product and their backward in five passes over (tokens x intermediate)
values, plus the split of the joint gate/up matmul's output and the concatenation of its gradient.
Here gate and up stay one tensor, and the activation times up is one C++ pass forward and one
backward (``hubtool::gated_act_fwd`` / ``gated_act_bwd`` in ``kernels/cpu/block_ops.cpp``), with the
same roundings to the model dtype as the module's own code.

RMSNorm (Gemma's ``x * r * (1 + w)`` and Llama's ``w * (x * r)``, r = 1/sqrt(mean(x^2) + eps)) is five
to seven passes forward and more backward in torch, with fp32 intermediates; here one pass each way
(``hubtool::rms_norm_fwd`` / ``rms_norm_bwd``), in fp32 with the module's roundings, the weight frozen.

Rotary position embedding (``x * cos + rotate_half(x) * sin`` for queries and keys) is six ops forward
and more backward; here one pass each (``hubtool::rope``), on the heads' transposed views without a copy.

Used only where it computes the module's own function: the forward's source has the gated MLP's line
(or the norm's lines), the activation is SiLU or tanh-GELU, gate and up run as one matmul of a
:class:`.qlinear.LinearGroup`, the norm's weight is frozen. Anything else runs the module's own forward.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
from torch import nn

from ..core.modules import NORM_EPS, norm_mode, rope_applies, rope_call_fits
from ..core.modules import has_lines as _has_lines
from ..core.modules import module_source as _module_source
from ..kernels import cpu

GATED_LINE = "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))"
SILU, GELU_TANH = 0, 1


class _GatedAct(torch.autograd.Function):
    """act(gu[..., :I]) * gu[..., I:] with its backward, one pass each."""

    @staticmethod
    def forward(ctx, gu, kind):
        ctx.save_for_backward(gu)
        ctx.kind = kind
        return torch.ops.hubtool.gated_act_fwd(gu, kind)

    @staticmethod
    def backward(ctx, dh):
        (gu,) = ctx.saved_tensors
        return torch.ops.hubtool.gated_act_bwd(dh.contiguous(), gu, ctx.kind), None


def gated_act(gu: torch.Tensor, kind: int) -> torch.Tensor:
    """``act(gate) * up`` for ``gu`` = [gate | up] in the last dimension (kind: SILU or GELU_TANH)."""
    return _GatedAct.apply(gu.contiguous(), kind)


def activation_kind(act: nn.Module) -> int | None:
    """SILU or GELU_TANH for the activations the fused op computes exactly; None for any other."""
    from transformers import activations

    if isinstance(act, (nn.SiLU, getattr(activations, "SiLUActivation", nn.SiLU))):
        return SILU
    if isinstance(act, activations.GELUTanh):
        fn = getattr(act, "act", None)
        if getattr(fn, "func", None) is torch.nn.functional.gelu and fn.keywords == {"approximate": "tanh"}:
            return GELU_TANH
    return None


def _is_gated_mlp(module: nn.Module) -> bool:
    if not all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return False
    return _has_lines(_module_source(module), (GATED_LINE,))


class _RMSNorm(torch.autograd.Function):
    """RMSNorm over the last dimension with a frozen fp32 weight; x in memory order (rows contiguous)."""

    @staticmethod
    def forward(ctx, x, w, eps, mode):
        y, rstd = torch.ops.hubtool.rms_norm_fwd(x, w, eps, mode)
        ctx.save_for_backward(x, w, rstd)
        ctx.mode = mode
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, rstd = ctx.saved_tensors
        return torch.ops.hubtool.rms_norm_bwd(dy.contiguous(), x, w, rstd, ctx.mode), None, None, None


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, mode: int) -> torch.Tensor:
    """RMSNorm of x's last dimension (fp32 weight ``w``: 1 + weight for mode 0, weight for mode 1).

    A permuted x (a transposed view, as attention's per-head norms get) runs in its memory order, so
    that nothing is copied; the result has x's strides.
    """
    xp, order = cpu.in_memory_order(x)
    return cpu.undo_order(_RMSNorm.apply(xp, w, eps, mode), order)


def _norm_forward(module: nn.Module, mode: int, original):
    eps = float(getattr(module, NORM_EPS[mode]))

    def forward(x):
        w = module.weight
        if w.requires_grad or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return original(x)
        if mode == 0:
            weight = 1.0 + w.detach().float()
        elif w.dtype == x.dtype:
            weight = w.detach().float()
        else:  # an fp32 weight on 16-bit x promotes the result: not the fused op's function
            return original(x)
        return rms_norm(x, weight.contiguous(), eps, mode)

    return forward


def _joint_input(module: nn.Module):
    """The LinearGroup running gate and up as one matmul (in that order, no hooks), or None."""
    gate, up = module.gate_proj, module.up_proj
    group = getattr(gate, "group", None)
    if group is None or getattr(up, "group", None) is not group or group.members != [gate, up]:
        return None
    if gate._forward_hooks or up._forward_hooks or gate._forward_pre_hooks or up._forward_pre_hooks:
        return None
    return group


def _fused_forward(module: nn.Module, kind: int, original):
    def forward(x):
        group = _joint_input(module)
        if group is None:
            return original(x)
        return module.down_proj(gated_act(group.joint(x), kind))

    return forward


class _Rope(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin over x's rows in memory order; cos/sin rows found by strides."""

    @staticmethod
    def forward(ctx, x, cos, sin, sizes, strides):
        ctx.save_for_backward(cos, sin)
        ctx.layout = (sizes, strides)
        return torch.ops.hubtool.rope(x, cos, sin, sizes, strides, False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        sizes, strides = ctx.layout
        return torch.ops.hubtool.rope(dy.contiguous(), cos, sin, sizes, strides, True), None, None, None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (B, H, L, D), cos/sin (B|1, L, D) broadcast over the heads; x's strides kept."""
    cos, sin = cos.contiguous(), sin.contiguous()
    xp, order, sizes, strides = cpu.rope_layout(x, cos)
    return cpu.undo_order(_Rope.apply(xp, cos, sin, sizes, strides), order)


def _fused_rope(original):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if not rope_call_fits(q, k, cos, sin, args, kwargs):
            return original(q, k, cos, sin, *args, **kwargs)
        return rope(q, cos, sin), rope(k, cos, sin)

    return apply_rotary_pos_emb


@contextlib.contextmanager
def cpu_fused_ops(block: nn.Module, device: torch.device) -> Iterator[None]:
    """While in this context, the block's gated MLPs and RMSNorms run fused (CPU, kernels built)."""
    patched = []
    swapped: list[tuple[dict, object]] = []
    if cpu.runs_on(device):
        for m in block.modules():
            g = getattr(sys.modules.get(type(m).__module__), "__dict__", {})
            fn = g.get("apply_rotary_pos_emb")
            if fn is not None and not any(d is g for d, _ in swapped) and rope_applies(fn, g):
                swapped.append((g, fn))
                g["apply_rotary_pos_emb"] = _fused_rope(fn)
            if "forward" in m.__dict__:
                continue
            kind = activation_kind(m.act_fn) if hasattr(m, "act_fn") else None
            if kind is not None and _is_gated_mlp(m):
                m.forward = _fused_forward(m, kind, m.forward)
                patched.append(m)
                continue
            mode = norm_mode(m)
            if mode is not None:
                m.forward = _norm_forward(m, mode, m.forward)
                patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward
        for g, fn in swapped:
            g["apply_rotary_pos_emb"] = fn
