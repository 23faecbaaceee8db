"""SignRound's tunable fake quantization (arXiv 2309.05516) and its SignSGD step.

Per weight a rounding offset ``V`` (init 0, kept in [-0.5, 0.5]); per group clipping factors ``alpha``
(on the negative end) and ``beta`` (on the positive end), kept in [0, 1] like auto-round. The scales are
:mod:`.scales`' (fp16-exact, straight-through for the gradient), so the codes are tuned against the
exact stored scale. The weight is ``s * (clamp(round(w/s + V) + z) - z)`` with straight-through
rounding; the clamp stops the gradient outside the code range.

* :class:`TunedLinear` - one linear's state: ``forward_into`` writes the fake-quantized weight and keeps
  its codes; ``backward_from`` takes dL/dW and, inside :func:`sign_sgd`, steps V, alpha and beta by the
  signs of their gradients (outside it, stores the gradients: the tests compare them with autograd);
  ``keep_best`` / ``int_weight`` hold and return the best iterate.
* :func:`sign_sgd` - the optimizer step: SignSGD only needs the signs of the gradients, so the step is
  taken where they are computed, and no gradient tensor is ever stored. One tuning iteration's step is
  ``with sign_sgd(states, lr): (loss * LOSS_SCALE).backward()``.
* :func:`tuned_matmul` - ``x @ W^T + b`` over the fake weights of linears that read the same input; its
  backward hands dL/dW to each state (on the CPU as an int8 matmul).

Speed: the gradients are written out by hand and computed with in-place passes over preallocated
buffers. On the CPU the forward and the backward each run as one fused C++ pass
(``kernels/cpu/signround.cpp``, the same arithmetic per element; ``HUBTOOL_SIGNROUND_FUSED=0`` runs the
torch code instead), and so does the symmetric alpha/beta step.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator

import torch
from torch.nn import functional as F

from ..core.intweight import IntWeight
from ..core.kquant import CODE_MAX, FIT_MAX, kquant_scales
from ..core.spec import QuantSpec
from .scales import asym_scale_zero, fused_available, kquant_fit, stored_scale_zero, sym_scale

INT8_GRAD_ENV = "HUBTOOL_SIGNROUND_INT8_GRAD"  # "0": dL/dW in the model dtype on the CPU too


class Scratch:
    """Reusable float32 buffers (one block's linears run one at a time through them)."""

    def __init__(self):
        self._tensors: dict[tuple, torch.Tensor] = {}

    def get(self, slot: int, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """A float32 buffer of ``shape`` (contents undefined)."""
        n = 1
        for d in shape:
            n *= d
        t = self._tensors.get((slot, device))
        if t is None or t.numel() < n:
            t = torch.empty(n, dtype=torch.float32, device=device)
            self._tensors[(slot, device)] = t
        return t[:n].view(shape)


class TunedLinear:
    """One linear's tuning state: fp32 grouped weight and ranges, V / alpha / beta, this and the best codes."""

    def __init__(
        self,
        name: str,
        weight: torch.Tensor,
        spec: QuantSpec,
        clip: torch.Tensor | None = None,
        scratch: Scratch | None = None,
    ):
        self.name = name
        self.spec = spec
        n, k = weight.shape
        # the weight itself, grouped (no float copy: bf16 -> fp32 is exact and done on the fly)
        self.wg = weight.detach().reshape(n, k // spec.group_size, spec.group_size)
        dev = self.wg.device
        self.wmin = self.wg.amin(-1).float().clamp(max=0)
        self.wmax = self.wg.amax(-1).float().clamp(min=0)
        shape = self.wg.shape[:2]
        init = clip.float().to(dev).contiguous() if clip is not None else torch.ones(shape, device=dev)
        self.v = torch.zeros(self.wg.shape, dtype=torch.float32, device=dev)
        self.alpha = init.clone()
        self.beta = init.clone()
        self.clip_max = 1.0
        if spec.kquant:  # relative to llama.cpp's Q4_K fit, which may reach past the range's ends
            alpha0, beta0 = kquant_fit(weight.detach())
            self.alpha.mul_(alpha0.to(dev))
            self.beta.mul_(beta0.to(dev))
            self.clip_max = FIT_MAX
        self.q = torch.empty(self.wg.shape, dtype=torch.int8, device=dev)  # codes of the last forward
        self.inside = torch.empty(self.wg.shape, dtype=torch.bool, device=dev)
        self.best = (
            torch.empty(self.wg.shape, dtype=torch.int8, device=dev),
            self.alpha.clone(),
            self.beta.clone(),
        )
        self.scratch = scratch or Scratch()
        self.step_lr: float | None = None  # set only by sign_sgd(): the step a backward takes
        self.grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # without a step
        self.grad_kind: str | None = None  # what the last backward got: "int8" or the gradient's dtype
        self._scale: tuple = ()  # of the last forward: (s, negative end) or (s, z, z unclamped)

    @property
    def rows(self) -> int:
        """out_features."""
        return self.wg.shape[0]

    # forward: the fake-quantized weight written into ``out`` (N, K) ------------------------------
    @torch.no_grad()
    def forward_into(self, out: torch.Tensor) -> None:
        """Write ``s * (q - z)`` for the current V, alpha, beta into ``out`` and keep the codes."""
        spec = self.spec
        if spec.kquant:
            self._kquant_forward(out)
            return
        if spec.sym:
            s, negative = sym_scale(self.wmin, self.wmax, self.alpha, self.beta, spec)
            self._scale = (s, negative)
            z = None
        else:
            s, z, z_inside = asym_scale_zero(self.wmin, self.wmax, self.alpha, self.beta, spec)
            self._scale = (s, z, z_inside)
        lo, hi = spec.code_range
        if fused_available(self.wg):
            zero = z if z is not None else torch.zeros_like(s)
            torch.ops.hubtool.signround_fwd(self.wg, self.v, s, zero, lo, hi, out, self.q, self.inside)
            return
        x = self.scratch.get(0, self.wg.shape, self.wg.device)
        s3 = s.unsqueeze(-1)
        torch.div(self.wg, s3, out=x)
        x.add_(self.v).round_()
        if z is not None:
            x.add_(z.unsqueeze(-1))
        torch.logical_and(x >= lo, x <= hi, out=self.inside)
        x.clamp_(lo, hi)
        self.q.copy_(x)
        if z is not None:
            x.sub_(z.unsqueeze(-1))
        torch.mul(x, s3, out=out.view(self.wg.shape))

    def _kquant_forward(self, out: torch.Tensor) -> None:
        """The forward in llama.cpp's Q4_K parameterization: ``s * q - mn`` with the stored two-level
        scale ``s`` and minimum ``mn`` (straight-through for their 6-bit rounding)."""
        s, mn, _ = kquant_scales(self.wmin, self.wmax, self.alpha, self.beta)
        self._scale = (s, mn)
        x = self.scratch.get(0, self.wg.shape, self.wg.device)
        torch.add(self.wg, mn.unsqueeze(-1), out=x)
        x.div_(torch.where(s > 0, s, 1.0).unsqueeze(-1)).add_(self.v).round_()
        torch.logical_and(x >= 0, x <= CODE_MAX, out=self.inside)
        x.clamp_(0, CODE_MAX)
        self.q.copy_(x)
        torch.sub(x.mul_(s.unsqueeze(-1)), mn.unsqueeze(-1), out=out.view(self.wg.shape))

    # backward: the gradients' group sums, then the SignSGD step (or stored gradients) -----------
    @torch.no_grad()
    def backward_from(self, g: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Take dL/dW (N, K) of the fake weight: step V, alpha, beta by the signs of their gradients
        (inside :func:`sign_sgd`), or store the gradients in ``grads`` (outside it).

        One of three kernels computes the group sums the clipping gradients need; the C++ ones step V in
        the same pass: an int32 product of int8 codes with ``scales`` = (row, col), dL/dW = g * row[:, None]
        * col[None, :] (C++); a float dL/dW on the CPU (C++); the torch code (elsewhere, or no step).
        """
        lr = self.step_lr
        self.grad_kind = "int8" if scales is not None else str(g.dtype).removeprefix("torch.")
        g = g.view(self.wg.shape)
        s = self._scale[0]
        dv = None  # dL/dV over s, when V has not stepped yet
        if scales is not None:
            sums = torch.ops.hubtool.signround_bwd_i32(
                g, *scales, self.inside, self.wg, self.q, s, self.v, lr
            )
        elif lr is not None and fused_available(self.wg):
            sums = torch.ops.hubtool.signround_bwd(g, self.inside, self.wg, self.q, s, self.v, lr)
        else:
            sums, dv = self._group_sums(g)
        if dv is None and self.spec.sym:  # alpha and beta step from the sums in one more C++ pass
            torch.ops.hubtool.sym_clip_step(
                sums, s, self._scale[1], self.wmin, self.wmax, self.alpha, self.beta, self.spec.sym_zero, lr
            )
            return
        dalpha, dbeta = self._clip_grads(*sums)
        if lr is None:
            self.grads = (dv * s.unsqueeze(-1), dalpha, dbeta)
            return
        if dv is not None:  # sign(dL/dV) = sign(g * inside * s)
            torch.sign(dv, out=dv)
            if self.spec.sym:
                dv.mul_(torch.sign(s.unsqueeze(-1)))
            self.v.sub_(dv, alpha=lr).clamp_(-0.5, 0.5)
        self.alpha.sub_(torch.sign(dalpha), alpha=lr).clamp_(0.0, self.clip_max)
        self.beta.sub_(torch.sign(dbeta), alpha=lr).clamp_(0.0, self.clip_max)

    def _group_sums(self, g: torch.Tensor) -> tuple[tuple, torch.Tensor]:
        """The torch code: per group sum(g * inside * w), sum(g * q) (and for asymmetric sum(g), sum(g * inside)),
        and g * inside (in a scratch buffer)."""
        gm = self.scratch.get(0, self.wg.shape, self.wg.device)
        tmp = self.scratch.get(1, self.wg.shape, self.wg.device)
        torch.mul(g, self.inside, out=gm)  # the clamp passes the gradient only inside the code range
        torch.mul(gm, self.wg, out=tmp)
        gw = tmp.sum(-1)
        torch.mul(g, self.q, out=tmp)
        gq = tmp.sum(-1)
        if self.spec.sym:
            return (gw, gq, None, None), gm
        return (gw, gq, g.float().sum(-1), gm.sum(-1)), gm

    def _clip_grads(self, gw, gq, g_sum, gin) -> tuple[torch.Tensor, torch.Tensor]:
        """dL/dalpha and dL/dbeta from the group sums."""
        spec = self.spec
        s = self._scale[0]
        if spec.kquant:
            # W = s * q - mn, q = clamp(round((w + mn) / s + v)): dL/ds = gq - (gw + mn * gin) / s,
            # dL/dmn = -(g_sum - gin); s = (b - a) / 15, mn = -a (straight through the 6-bit rounding)
            mn = self._scale[1]
            ds = (gq - (gw + mn * gin) / torch.where(s > 0, s, 1.0)) / CODE_MAX
            return (g_sum - gin - ds) * self.wmin, ds * self.wmax
        if spec.sym:
            negative = self._scale[1]
            # W = s * q: dW/ds = q - inside * w / s ; s = max_v / -half
            dmax = (gq - gw / s) / -spec.sym_zero
            zero = torch.zeros_like(dmax)
            return torch.where(negative, dmax * self.wmin, zero), torch.where(
                negative, zero, dmax * self.wmax
            )
        _, z, z_inside = self._scale
        # W = s * (q - z), q = clamp(round(w/s + v) + z): direct dW/ds = (q - z) - inside * w/s,
        # dW/dz = -s * (1 - inside); z = round(-a/s); s = (b - a) / qmax
        ds_direct = gq - z * g_sum - gw / s
        dz = -s * (g_sum - gin)
        a = self.wmin * self.alpha
        ds = ds_direct + dz * z_inside * a / (s * s)
        da = -ds / spec.qmax - dz * z_inside / s
        db = ds / spec.qmax
        return da * self.wmin, db * self.wmax

    @torch.no_grad()
    def keep_best(self) -> None:
        """Remember the codes and clipping of the last forward as the best iterate."""
        q, a, b = self.best
        q.copy_(self.q)
        a.copy_(self.alpha)
        b.copy_(self.beta)

    @torch.no_grad()
    def int_weight(self, best: bool = True) -> IntWeight:
        """The codes of the best iterate (or of the last forward), with their fp16-exact scales."""
        q, alpha, beta = self.best if best else (self.q, self.alpha, self.beta)
        if self.spec.kquant:
            scale, _, kq = kquant_scales(self.wmin, self.wmax, alpha, beta)
            return IntWeight(
                q=q.reshape(self.rows, -1).to(torch.uint8).cpu(),
                scale=scale.cpu(),
                zero=torch.zeros(scale.shape, dtype=torch.uint8),
                group_size=self.spec.group_size,
                bits=self.spec.bits,
                kquant=kq.to("cpu"),
            )
        scale, zero = stored_scale_zero(self.wmin, self.wmax, alpha, beta, self.spec)
        codes = q.to(torch.int16) + self.spec.sym_zero if self.spec.sym else q.to(torch.int16)
        return IntWeight(
            q=codes.reshape(self.rows, -1).to(torch.uint8).cpu(),
            scale=scale.float().cpu(),
            zero=zero.to(torch.uint8).cpu(),
            group_size=self.spec.group_size,
            bits=self.spec.bits,
        )


@contextlib.contextmanager
def sign_sgd(states: Iterable[TunedLinear], lr: float) -> Iterator[None]:
    """A backward run in this context steps every state's V, alpha and beta by ``-lr * sign(gradient)``
    (then clamps them to their ranges), where each gradient is computed."""
    states = list(states)
    for s in states:
        s.step_lr = lr
    try:
        yield
    finally:
        for s in states:
            s.step_lr = None


def _int8_grad(states: list[TunedLinear]) -> bool:
    """Whether dL/dW of these linears is taken as an int8 matmul (CPU fused path, stepping)."""
    return os.environ.get(INT8_GRAD_ENV, "1") != "0" and all(
        s.step_lr is not None and fused_available(s.wg) for s in states
    )


class _TunedMatmul(torch.autograd.Function):
    """``x @ W^T + b`` with W the concatenated fake-quantized weights of a group of linears.

    The backward returns dL/dx (if needed) and hands dL/dW to the tuning states. On the CPU, when they
    step, dL/dW = dY^T X is an int8 matmul: dY and X quantized per column (max over the tokens), about
    twice bf16's speed; only its signs and per-group sums are used.
    """

    @staticmethod
    def forward(ctx, x, handle, states, bias):
        rows = sum(s.rows for s in states)
        k = states[0].wg.shape[1] * states[0].wg.shape[2]
        w = torch.empty(rows, k, dtype=x.dtype, device=x.device)
        r = 0
        for s in states:
            s.forward_into(w[r : r + s.rows])
            r += s.rows
        ctx.save_for_backward(x, w)
        ctx.states = states
        ctx.handle_device = handle.device
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        states = ctx.states
        dx = grad @ w if ctx.needs_input_grad[0] else None
        g2 = grad.reshape(-1, grad.shape[-1]).contiguous()
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        if _int8_grad(states):
            qx, sx = torch.ops.hubtool.quantize_cols_i8(x2)
            qg, sg = torch.ops.hubtool.quantize_cols_i8(g2)

            def part(r, n):  # one linear's (n, K) int32 at a time, not the whole group's (exact either way)
                return torch._int_mm(qg[:, r : r + n].t(), qx), (sg[r : r + n], sx)
        else:
            gw = g2.t() @ x2

            def part(r, n):
                return gw[r : r + n], None

        r = 0
        for s in states:
            s.backward_from(*part(r, s.rows))
            r += s.rows
        return dx, torch.zeros((), device=ctx.handle_device), None, None


def tuned_matmul(
    x: torch.Tensor, handle: torch.Tensor, states: list[TunedLinear], bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ W^T + b`` over the states' fake weights; ``handle`` (requires grad) makes autograd call the backward."""
    return _TunedMatmul.apply(x, handle, states, bias)
