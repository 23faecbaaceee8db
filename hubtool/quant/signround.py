"""SignRound's tunable fake quantization (arXiv 2309.05516) with the SignSGD step fused into its backward.

Per weight a rounding offset ``V`` (init 0, kept in [-0.5, 0.5]); per group clipping factors ``alpha``
(on the negative end) and ``beta`` (on the positive end), kept in [0, 1] like auto-round. Symmetric
quantization uses the "full range" scale ``max_v / -2**(bits-1)``, ``max_v`` being the signed end of
larger magnitude after clipping; asymmetric uses ``(beta*max - alpha*min) / 15`` with a rounded zero
point. Scales are rounded to fp16 (what every format stores; straight-through for the gradient), so
the codes are tuned against the exact stored scale. The weight is ``s * (clamp(round(w/s + V) + z) - z)``
with straight-through rounding; the clamp stops the gradient outside the code range.

Speed: the gradients are written out by hand (checked against autograd in the tests) and computed
with in-place passes over preallocated buffers; SignSGD only needs their signs, so the update of V,
alpha and beta happens inside the backward (``TunedLinear.lr`` must be set first) and no gradient
tensor is ever stored. The codes of each iteration are kept, so the best iterate is a copy of int8 codes.
On the CPU the forward and the backward each run as one fused C++ pass (``kernels/cpu/signround.cpp``,
the same arithmetic per element; ``HUBTOOL_SIGNROUND_FUSED=0`` runs the torch code below instead), and so
do the symmetric scale and the alpha/beta step.
Linears that read the same input (q/k/v, gate/up) run as one matmul on their concatenated weights.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.nn import functional as F

from ..core.intweight import IntWeight, fp16_exact
from ..core.spec import QuantSpec

_FUSED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


_FUSED: dict[str, bool] = {}
FUSED_ENV = "HUBTOOL_SIGNROUND_FUSED"  # "0": the torch code below on the CPU too
INT8_GRAD_ENV = "HUBTOOL_SIGNROUND_INT8_GRAD"  # "0": dL/dW in the model dtype on the CPU too


def _kernels_on(t: torch.Tensor) -> bool:
    """Whether the C++ kernels run for tensors on t's device (CPU, library built, not turned off)."""
    if t.device.type != "cpu":
        return False
    if "ok" not in _FUSED:
        from ..kernels import cpu

        _FUSED["ok"] = os.environ.get(FUSED_ENV, "1") != "0" and cpu.load()
    return _FUSED["ok"]


def fused_available(wg: torch.Tensor) -> bool:
    """Whether the fused C++ step runs for this grouped weight (CPU, contiguous, G % 16 == 0, library built)."""
    return wg.is_contiguous() and wg.dtype in _FUSED_DTYPES and not wg.shape[-1] % 16 and _kernels_on(wg)


def sym_scale(
    wmin: torch.Tensor, wmax: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-range symmetric scale per group (fp16-exact) and whether it came from the negative end."""
    ts = (wmin, wmax, alpha, beta)
    if all(
        t.shape == wmin.shape and t.dtype == torch.float32 and t.is_contiguous() for t in ts
    ) and _kernels_on(wmin):
        return torch.ops.hubtool.sym_scale(wmin, wmax, alpha, beta, spec.sym_zero)
    a = wmin * alpha
    b = wmax * beta
    sel = (-a) >= b
    return fp16_exact(torch.where(sel, a, b) / -spec.sym_zero), sel


def asym_scale_zero(
    wmin: torch.Tensor, wmax: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric scale (fp16-exact), zero point in [1, qmax] and whether the zero is unclamped."""
    a = wmin * alpha
    b = wmax * beta
    scale = fp16_exact(((b - a) / spec.qmax).clamp(min=1e-9))
    z = torch.round(-a / scale)
    zero = z.clamp(1, spec.qmax)
    return scale, zero, z == zero


class Scratch:
    """Reusable float32 buffers (one block's linears run one at a time through them)."""

    def __init__(self):
        self._bufs: dict[tuple, torch.Tensor] = {}

    def get(self, slot: int, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """A float32 buffer of ``shape`` (contents undefined)."""
        n = 1
        for d in shape:
            n *= d
        buf = self._bufs.get((slot, device))
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=torch.float32, device=device)
            self._bufs[(slot, device)] = buf
        return buf[:n].view(shape)


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
        self.q = torch.empty(self.wg.shape, dtype=torch.int8, device=dev)  # codes of the last forward
        self.inside = torch.empty(self.wg.shape, dtype=torch.bool, device=dev)
        self.best = (torch.empty(self.wg.shape, dtype=torch.int8, device=dev), init.clone(), init.clone())
        self.scratch = scratch or Scratch()
        self.lr: float | None = None  # SignSGD step applied in backward; None: store the gradients instead
        self.grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.grad_kind: str | None = None  # what the last backward got: "int8" or the gradient's dtype
        self._ctx: tuple = ()

    @property
    def rows(self) -> int:
        """out_features."""
        return self.wg.shape[0]

    # forward: the fake-quantized weight written into ``out`` (N, K) ------------------------------
    @torch.no_grad()
    def forward_into(self, out: torch.Tensor) -> None:
        """Write ``s * (q - z)`` for the current V, alpha, beta into ``out`` and keep the codes."""
        spec = self.spec
        if spec.sym:
            s, sel = sym_scale(self.wmin, self.wmax, self.alpha, self.beta, spec)
            self._ctx = (s, sel)
            z = None
        else:
            s, z, zin = asym_scale_zero(self.wmin, self.wmax, self.alpha, self.beta, spec)
            self._ctx = (s, z, zin)
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

    # backward: gradients by hand, then the SignSGD step (or stored gradients) -------------------
    @torch.no_grad()
    def backward_from(self, g: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Take dL/dW (N, K) of the fake weight; step V, alpha, beta by the signs of their gradients.

        With ``scales`` = (row, col), ``g`` is an int32 product of int8 codes and dL/dW = g * row[:, None]
        * col[None, :] (the int8 backward, fused path only).
        """
        spec = self.spec
        self.grad_kind = "int8" if scales is not None else str(g.dtype).removeprefix("torch.")
        g = g.view(self.wg.shape)
        s = self._ctx[0]
        s3 = s.unsqueeze(-1)
        gm = sums = None
        if scales is not None:
            row, col = scales
            sums = torch.ops.hubtool.signround_bwd_i32(
                g, row, col, self.inside, self.wg, self.q, s, self.v, self.lr
            )
        elif self.lr is not None and fused_available(self.wg):  # the sums and the step of V in one pass
            sums = torch.ops.hubtool.signround_bwd(g, self.inside, self.wg, self.q, s, self.v, self.lr)
        if sums is not None and spec.sym:  # V has stepped; alpha and beta step in one more pass
            _, sel = self._ctx
            z = spec.sym_zero
            torch.ops.hubtool.sym_clip_step(
                sums, s, sel, self.wmin, self.wmax, self.alpha, self.beta, z, self.lr
            )
            return
        if sums is not None:
            gw, gq, g_sum, gin = sums
        else:
            gm = self.scratch.get(0, self.wg.shape, self.wg.device)
            tmp = self.scratch.get(1, self.wg.shape, self.wg.device)
            torch.mul(g, self.inside, out=gm)  # the clamp passes the gradient only inside the code range
            torch.mul(gm, self.wg, out=tmp)
            gw = tmp.sum(-1)  # sum g * inside * w
            torch.mul(g, self.q, out=tmp)
            gq = tmp.sum(-1)  # sum g * q
            g_sum = gin = None
            if not spec.sym:
                g_sum, gin = g.float().sum(-1), gm.sum(-1)
        if spec.sym:
            _, sel = self._ctx
            # W = s * q: dW/ds = q - inside * w / s ; s = max_v / -half
            ds = gq - gw / s
            dmax = ds / -spec.sym_zero
            zero = torch.zeros_like(dmax)
            dalpha = torch.where(sel, dmax * self.wmin, zero)
            dbeta = torch.where(sel, zero, dmax * self.wmax)
        else:
            _, z, zin = self._ctx
            # W = s * (q - z), q = clamp(round(w/s + v) + z): direct dW/ds = (q - z) - inside * w/s,
            # dW/dz = -s * (1 - inside); z = round(-a/s); s = (b - a) / qmax
            ds_direct = gq - z * g_sum - gw / s
            dz = -s * (g_sum - gin)
            a = self.wmin * self.alpha
            ds = ds_direct + dz * zin * a / (s * s)
            da = -ds / spec.qmax - dz * zin / s
            db = ds / spec.qmax
            dalpha = da * self.wmin
            dbeta = db * self.wmax
        if self.lr is None:
            self.grads = (gm * s3, dalpha, dbeta)
            return
        if gm is not None:
            # sign(dL/dV) = sign(g * inside * s)
            torch.sign(gm, out=gm)
            if spec.sym:
                gm.mul_(torch.sign(s3))
            self.v.sub_(gm, alpha=self.lr).clamp_(-0.5, 0.5)
        self.alpha.sub_(torch.sign(dalpha), alpha=self.lr).clamp_(0.0, 1.0)
        self.beta.sub_(torch.sign(dbeta), alpha=self.lr).clamp_(0.0, 1.0)

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
        if self.spec.sym:
            scale, _ = sym_scale(self.wmin, self.wmax, alpha, beta, self.spec)
            zero = torch.full_like(scale, float(self.spec.sym_zero))
            codes = q.to(torch.int16) + self.spec.sym_zero
        else:
            scale, zero, _ = asym_scale_zero(self.wmin, self.wmax, alpha, beta, self.spec)
            codes = q.to(torch.int16)
        n = self.rows
        return IntWeight(
            q=codes.reshape(n, -1).to(torch.uint8).cpu(),
            scale=scale.float().cpu(),
            zero=zero.to(torch.uint8).cpu(),
            group_size=self.spec.group_size,
            bits=self.spec.bits,
        )


def _int8_grad(states: list[TunedLinear]) -> bool:
    """Whether dL/dW of these linears is taken as an int8 matmul (CPU fused path, SignSGD step set)."""
    return os.environ.get(INT8_GRAD_ENV, "1") != "0" and all(
        s.lr is not None and fused_available(s.wg) for s in states
    )


class _TunedMatmul(torch.autograd.Function):
    """``x @ W^T + b`` with W the concatenated fake-quantized weights of a group of linears.

    The backward returns dL/dx (if needed) and hands dL/dW to the tuning states, which step V, alpha
    and beta by its signs. On the CPU dL/dW = dY^T X is an int8 matmul: dY and X quantized per column
    (max over the tokens), about twice bf16's speed; only its signs and per-group sums are used.
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
            acc = torch._int_mm(qg.t(), qx)  # (rows, K) int32

            def part(r, n):
                return acc[r : r + n], (sg[r : r + n], sx)
        else:
            gw = g2.t() @ x2

            def part(r, n):
                return gw[r : r + n], None

        r = 0
        for s in states:
            s.backward_from(*part(r, s.rows))
            r += s.rows
        return dx, torch.zeros((), device=ctx.handle_device), None, None


class LinearGroup:
    """Linears of one block that read the same input, run as one matmul on their concatenated weights.

    Modes: the original weights, fixed (dequantized) weights, or the tuning states.
    """

    def __init__(self, members: list[QLinear]):
        self.members = members
        for m in members:
            m.group = self
        first = members[0].linear.weight
        self.dtype, self.device = first.dtype, first.device
        self.handle = torch.zeros((), device=self.device, requires_grad=True)
        self.sizes = [m.linear.out_features for m in members]
        biases = [m.linear.bias for m in members]
        self.bias = None
        if any(b is not None for b in biases):
            self.bias = torch.cat(
                [
                    b.detach() if b is not None else first.new_zeros(n)
                    for b, n in zip(biases, self.sizes, strict=True)
                ]
            )
        self.weight: torch.Tensor | None = None
        self.states: list[TunedLinear] | None = None
        self.use_original()

    def use_original(self) -> None:
        """Run with the model's own weights."""
        self.states = None
        ws = [m.linear.weight for m in self.members]
        self.weight = ws[0] if len(ws) == 1 else torch.cat(ws)
        self._x, self._outs = None, {}

    def use_fixed(self, weights: list[torch.Tensor]) -> None:
        """Run with these dequantized weights (one per member)."""
        self.states = None
        self.weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        self._x, self._outs = None, {}

    def use_states(self, states: list[TunedLinear]) -> None:
        """Run with the fake-quantized weights of the tuning states."""
        self.states = states
        self.weight = None
        self._x, self._outs = None, {}

    def release(self) -> None:
        """Drop every reference (the group and its members point at each other)."""
        for m in self.members:
            m.group = None
        self.members, self.states, self.weight, self._x, self._outs = [], None, None, None, {}

    def joint(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's output for input x, concatenated in the last dimension (one matmul)."""
        if x.device != self.device:  # blocks spread over devices (--device-map)
            x = x.to(self.device)
        if self.states is None:
            y = F.linear(x.to(self.weight.dtype), self.weight, self.bias)
        else:
            y = _TunedMatmul.apply(x.to(self.dtype), self.handle, self.states, self.bias)
        return y

    def output(self, member: QLinear, x: torch.Tensor) -> torch.Tensor:
        """Member's output for input x; on a new input all members are computed at once."""
        key = id(member)
        if self._x is x and key in self._outs:
            return self._outs.pop(key)
        y = self.joint(x)
        if len(self.members) == 1:
            return y
        outs = [o.contiguous() for o in y.split(self.sizes, dim=-1)]  # strided views make every later op slow
        self._x = x
        self._outs = {id(m): o for m, o in zip(self.members, outs, strict=True) if m is not member}
        return outs[self.members.index(member)]


class QLinear(nn.Module):
    """Stands in for an nn.Linear inside a block while it is tuned or evaluated quantized."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self.group: LinearGroup | None = None
        LinearGroup([self])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The linear's output under its group's current mode."""
        return self.group.output(self, x)
