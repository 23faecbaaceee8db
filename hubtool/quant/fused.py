"""Fused elementwise ops for block tuning on the CPU: the gated MLP's activation.

A gated MLP (Llama, Gemma, Qwen, Mistral: ``down(act(gate(x)) * up(x))``) spends, per tuning
iteration, an activation, a product and their backward in five passes over (tokens x intermediate)
values, plus the split of the joint gate/up matmul's output and the concatenation of its gradient.
Here gate and up stay one tensor, and the activation times up is one C++ pass forward and one
backward (``hubtool::gated_act_fwd`` / ``gated_act_bwd`` in ``kernels/cpu/block_ops.cpp``), with the
same roundings to the model dtype as the module's own code.

Used only where it computes the module's own function: the forward's source is the gated MLP's line,
the activation is SiLU or tanh-GELU, and gate and up run as one matmul of a :class:`.signround.LinearGroup`.
Anything else runs the module's own forward.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
from torch import nn

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
    try:
        src = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    return "".join(GATED_LINE.split()) in "".join(src.split())


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


@contextlib.contextmanager
def cpu_fused_mlp(block: nn.Module, device: torch.device) -> Iterator[None]:
    """While in this context, the block's gated MLPs run the fused activation (CPU, kernels built)."""
    from ..kernels import cpu

    patched = []
    if device.type == "cpu" and cpu.load():
        for m in block.modules():
            kind = activation_kind(m.act_fn) if hasattr(m, "act_fn") else None
            if kind is not None and "forward" not in m.__dict__ and _is_gated_mlp(m):
                m.forward = _fused_forward(m, kind, m.forward)
                patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward
