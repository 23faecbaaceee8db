"""SignRound's tunable fake quantization of one linear (arXiv 2309.05516), and its SignSGD step.

Per weight a rounding offset ``V`` (init 0, kept in [-0.5, 0.5]); per group clipping factors ``alpha``
(on the negative end) and ``beta`` (on the positive end), kept in [0, 1] like auto-round. Symmetric
quantization uses the "full range" scale ``max_v / -2**(bits-1)`` where ``max_v`` is the signed end of
larger magnitude after clipping; scales are rounded to fp16 (what every format stores) with a
straight-through estimator, so the codes are tuned against the exact stored scale. The weight is
``s * clamp(round(w / s + V), ...)`` with a straight-through gradient for the rounding.

The symmetric path is one fused autograd function (few elementwise passes, no autograd graph per op);
the asymmetric path uses plain autograd ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .rtn import IntWeight, group_view, quantize_with
from .spec import QuantSpec

FP16_TINY = torch.finfo(torch.float16).tiny


def _fp16_round(s: torch.Tensor) -> torch.Tensor:
    """fp16-representable value of s (sign kept, magnitude at least the smallest normal fp16)."""
    r = s.to(torch.float16).float()
    return torch.where(r.abs() < FP16_TINY, torch.where(s < 0, -FP16_TINY, FP16_TINY), r)


def sym_scale(
    wmin: torch.Tensor, wmax: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-range symmetric scale per group (fp16-exact, no gradient) and which end it came from."""
    a = wmin * alpha
    b = wmax * beta
    sel = (-a) >= b
    max_v = torch.where(sel, a, b)
    return _fp16_round(max_v / -spec.sym_zero), sel


def asym_scale_zero(
    wmin: torch.Tensor, wmax: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric scale (fp16-exact) and zero point per group, as ``scales_from_range`` computes them."""
    a = wmin * alpha
    b = wmax * beta
    scale = _fp16_round(((b - a) / spec.qmax).clamp(min=1e-9))
    zero = torch.round(-a / scale).clamp(1, spec.qmax)
    return scale, zero


class _SymFakeQuant(torch.autograd.Function):
    """Fused symmetric fake quantization with straight-through rounding; returns the (N, K) weight."""

    @staticmethod
    def forward(ctx, wg, v, alpha, beta, wmin, wmax, half: int, out_dtype):
        a = wmin * alpha
        b = wmax * beta
        sel = (-a) >= b
        s = _fp16_round(torch.where(sel, a, b) / -half)
        s3 = s.unsqueeze(-1)
        r = torch.round(wg / s3 + v)
        inside = (r >= -half) & (r <= half - 1)
        q = r.clamp_(-half, half - 1)
        ctx.save_for_backward(wg, s, sel, q.to(torch.int8), inside, wmin, wmax)
        ctx.half = half
        return (q * s3).reshape(wg.shape[0], -1).to(out_dtype)

    @staticmethod
    def backward(ctx, grad):
        wg, s, sel, q8, inside, wmin, wmax = ctx.saved_tensors
        half = ctx.half
        g = grad.float().reshape(wg.shape)
        s3 = s.unsqueeze(-1)
        # round passes the gradient straight through; the clamp stops it outside the code range
        gm = g * inside
        dv = gm * s3
        # d(s * q)/ds = q + s * d(w/s)/ds inside the range = q - w/s
        ds = (g * q8 - gm * (wg / s3)).sum(-1)
        dmax = ds / -half
        zero = torch.zeros_like(dmax)
        dalpha = torch.where(sel, dmax * wmin, zero)
        dbeta = torch.where(sel, zero, dmax * wmax)
        return None, dv, dalpha, dbeta, None, None, None, None


@dataclass
class TunedLinear:
    """The tuning state of one linear: fp32 grouped weight, its ranges and the tunable V, alpha, beta."""

    name: str
    wg: torch.Tensor  # (N, G#, G) float32
    wmin: torch.Tensor  # (N, G#) min(w, 0)
    wmax: torch.Tensor  # (N, G#) max(w, 0)
    v: torch.Tensor  # (N, G#, G) float32, requires grad
    alpha: torch.Tensor  # (N, G#) float32, requires grad
    beta: torch.Tensor  # (N, G#) float32, requires grad
    spec: QuantSpec
    out_dtype: torch.dtype

    @classmethod
    def create(
        cls, name: str, weight: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | None = None
    ) -> TunedLinear:
        """State for ``weight`` (N, K), alpha = beta = ``clip`` per group (the searched clipping) or 1."""
        wg = group_view(weight.detach(), spec.group_size).contiguous()
        shape = wg.shape[:2]
        init = clip.float().to(wg.device) if clip is not None else torch.ones(shape, device=wg.device)
        return cls(
            name=name,
            wg=wg,
            wmin=wg.amin(-1).clamp(max=0),
            wmax=wg.amax(-1).clamp(min=0),
            v=torch.zeros_like(wg, requires_grad=True),
            alpha=init.clone().requires_grad_(True),
            beta=init.clone().requires_grad_(True),
            spec=spec,
            out_dtype=weight.dtype,
        )

    def params(self) -> list[torch.Tensor]:
        """The tunable tensors."""
        return [self.v, self.alpha, self.beta]

    def fake_weight(self) -> torch.Tensor:
        """The dequantized (N, K) weight for the current V, alpha, beta, differentiable in all three."""
        if self.spec.sym:
            return _SymFakeQuant.apply(
                self.wg,
                self.v,
                self.alpha,
                self.beta,
                self.wmin,
                self.wmax,
                self.spec.sym_zero,
                self.out_dtype,
            )
        return self._asym_fake_weight()

    def _asym_fake_weight(self) -> torch.Tensor:
        spec = self.spec
        a = self.wmin * self.alpha
        b = self.wmax * self.beta
        s = ((b - a) / spec.qmax).clamp(min=1e-9)
        s = s + (_fp16_round(s.detach()) - s).detach()
        z = -a / s
        z = (z + (torch.round(z) - z).detach()).clamp(1, spec.qmax)
        s3, z3 = s.unsqueeze(-1), z.unsqueeze(-1)
        x = self.wg / s3 + self.v
        x = x + (torch.round(x) - x).detach()
        q = torch.clamp(x + z3, 0, spec.qmax)
        return (s3 * (q - z3)).reshape(self.wg.shape[0], -1).to(self.out_dtype)

    @torch.no_grad()
    def int_weight(self, v: torch.Tensor | None = None, alpha=None, beta=None) -> IntWeight:
        """The final codes for the given (default: current) parameters, against fp16-exact scales."""
        v = self.v if v is None else v
        alpha = self.alpha if alpha is None else alpha
        beta = self.beta if beta is None else beta
        if self.spec.sym:
            scale, _ = sym_scale(self.wmin, self.wmax, alpha, beta, self.spec)
            zero = torch.full_like(scale, float(self.spec.sym_zero))
        else:
            scale, zero = asym_scale_zero(self.wmin, self.wmax, alpha, beta, self.spec)
        n = self.wg.shape[0]
        iw = quantize_with(self.wg.reshape(n, -1), self.spec, scale, zero, v.reshape(n, -1))
        return IntWeight(iw.q.cpu(), iw.scale.cpu(), iw.zero.cpu(), iw.group_size, iw.bits)

    @torch.no_grad()
    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A copy of (V, alpha, beta)."""
        return self.v.detach().clone(), self.alpha.detach().clone(), self.beta.detach().clone()

    @torch.no_grad()
    def sign_step(self, lr: float) -> None:
        """One SignSGD step (p -= lr * sign(grad)), then the clamps; clears the gradients."""
        for p, lo, hi in ((self.v, -0.5, 0.5), (self.alpha, 0.0, 1.0), (self.beta, 0.0, 1.0)):
            if p.grad is not None:
                p.sub_(torch.sign(p.grad), alpha=lr).clamp_(lo, hi)
                p.grad = None


class QLinear(nn.Module):
    """Stands in for an nn.Linear inside a block while it is tuned or evaluated quantized."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self.state: TunedLinear | None = None
        self.fixed: torch.Tensor | None = None  # a dequantized weight to use instead (no tuning)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """F.linear with the fixed weight, the tuned fake-quantized weight, or the original one."""
        if self.fixed is not None:
            w = self.fixed
        elif self.state is not None:
            w = self.state.fake_weight()
        else:
            w = self.linear.weight
        if x.device != w.device:  # blocks spread over devices (--device-map)
            x = x.to(w.device)
        return F.linear(x.to(w.dtype), w, self.linear.bias)
