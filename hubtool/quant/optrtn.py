"""Optimized RTN: per group, the clipping of the range that minimizes the layer's output error.

For a linear with input activations X (tokens x K) the output error of a quantized weight Q is
``||X (W - Q)^T||^2 = sum_n e_n H e_n^T`` with ``H = X^T X`` and ``e_n`` the error of output row n.
Keeping only H's diagonal blocks (one G x G block per group) the error splits into independent
per-group terms ``e_{n,g} H_g e_{n,g}^T``, so every group can pick its own clipping factor from a grid in
one vectorized pass per candidate (a batched (N x G) @ (G x G) product per group column).

* :class:`HessianCollector` - forward hooks that accumulate those blocks of ``X^T X`` per linear (and
  note which linears read the same input);
* :func:`search_clip` - the clipping per group (alpha = beta = c): a coarse grid, then a finer pass;
* :func:`quantize_clipped` - the codes for a clipping, with :mod:`.scales`' fp16-exact scales.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.intweight import IntWeight, group_view, quantize_kquant, row_chunks
from ..core.kquant import kquant_codes, kquant_scales
from ..core.spec import QuantSpec
from .scales import fused_available, kquant_fit, stored_scale_zero

# Clipping factors tried (alpha = beta = c): a grid from 0.5 to 1, then a finer pass around the best.
COARSE = torch.linspace(0.5, 1.0, 21)
FINE_STEPS = (-0.0125, -0.00625, 0.00625, 0.0125)


class HessianCollector:
    """Accumulates the G x G diagonal blocks of ``X^T X`` of each linear's input (float32), padding masked.

    ``h[name]`` is (K // G, G, G): only these blocks enter the per-group error, and they cost
    K * T * G multiply-adds instead of K * K * T for the whole matrix.
    """

    def __init__(self, linears: dict[str, nn.Module], group_size: int):
        self.g = group_size
        self.h: dict[str, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None  # (B, L) of the current batch, or None
        self._shared: dict[int, tuple[torch.Tensor, torch.Tensor, str]] = {}
        self.same_input: dict[str, list[str]] = {}  # first reader of an input -> every linear reading it
        self._handles = [lin.register_forward_hook(self._hook(name)) for name, lin in linears.items()]

    def __enter__(self) -> HessianCollector:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def new_batch(self, mask: torch.Tensor | None) -> None:
        """Call before each forward: the valid-token mask (B, L) of the batch."""
        self.mask = mask
        self._shared.clear()

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0]
            key = id(x)
            hit = self._shared.get(key)
            xtx = hit[1] if hit is not None and hit[0] is x else None
            if xtx is not None and not any(name in g for g in self.same_input.values()):
                self.same_input.setdefault(hit[2], [hit[2]]).append(name)
            if xtx is None:
                flat = x.detach().reshape(-1, x.shape[-1])
                if self.mask is not None and self.mask.numel() == flat.shape[0]:
                    flat = flat[self.mask.reshape(-1).to(flat.device)]
                k = flat.shape[-1]
                xtx = torch.zeros(k // self.g, self.g, self.g, device=flat.device)
                for r in row_chunks(flat.shape[0], k):  # float32 copies of a few MB, not of the batch
                    xg = flat[r].float().reshape(-1, k // self.g, self.g).transpose(0, 1)  # (G#, T, G)
                    xtx.baddbmm_(xg.transpose(1, 2), xg)
                self._shared[key] = (x, xtx, name)  # x kept alive so that its id is not reused
            if name in self.h:
                self.h[name] += xtx
            else:
                self.h[name] = xtx.clone()

        return hook

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._shared.clear()


class _Search:
    """Per-group output error of clipped RTN for one weight, with preallocated buffers."""

    def __init__(self, weight: torch.Tensor, h: torch.Tensor | None, spec: QuantSpec):
        self.spec = spec
        self.wg = group_view(weight.detach(), spec.group_size).contiguous()
        self.wmin = self.wg.amin(-1).clamp(max=0)
        self.wmax = self.wg.amax(-1).clamp(min=0)
        self.hb = h.to(self.wg.device).float() if h is not None else None
        self.e = torch.empty_like(self.wg)
        n, ng, g = self.wg.shape
        self.y = torch.empty(ng, n, g, device=self.wg.device) if h is not None else None
        self.fused = fused_available(self.wg) and not spec.kquant
        # Q4_K: c scales llama.cpp's fitted range (c = 1: its own Q4_K) instead of the weight's
        self.fit = kquant_fit(weight.detach()) if spec.kquant else None

    def codes(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q - zero) in self.e (float, grouped), scale and zero for clipping c."""
        spec = self.spec
        scale, zero = stored_scale_zero(self.wmin, self.wmax, c, c, spec)
        s3 = scale.unsqueeze(-1)
        e = self.e
        torch.div(self.wg, s3, out=e)
        e.round_()
        if spec.sym:
            e.clamp_(*spec.code_range)
        else:
            z3 = zero.unsqueeze(-1)
            e.add_(z3).clamp_(*spec.code_range).sub_(z3)
        return e, scale, zero

    def errors(self, c: torch.Tensor) -> torch.Tensor:
        """Per-group error (N, G#) of clipping c (a scalar tensor or (N, G#))."""
        if self.fused:  # the weight error in one C++ pass, already laid out for the batched product
            scale, zero = stored_scale_zero(self.wmin, self.wmax, c, c, self.spec)
            z = torch.zeros_like(scale) if self.spec.sym else zero
            lo, hi = self.spec.code_range
            et = torch.ops.hubtool.clip_error(self.wg, scale.contiguous(), z.contiguous(), lo, hi)
        elif self.spec.kquant:
            scale, minimum, _ = kquant_scales(self.wmin, self.wmax, c * self.fit[0], c * self.fit[1])
            e = kquant_codes(self.wg, scale, minimum).mul_(scale.unsqueeze(-1)).sub_(minimum.unsqueeze(-1))
            et = torch.sub(self.wg, e, out=e).transpose(0, 1)  # the weight error, (G#, N, G)
        else:
            e, scale, _ = self.codes(c)
            e.mul_(scale.unsqueeze(-1))
            torch.sub(self.wg, e, out=e)  # the weight error
            et = e.transpose(0, 1)  # (G#, N, G)
        if self.hb is None:
            return et.pow_(2).sum(-1).T
        torch.bmm(et, self.hb, out=self.y)
        return self.y.mul_(et).sum(-1).T


@torch.no_grad()
def search_clip(weight: torch.Tensor, h: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Per-group clipping (N, G#) minimizing the output error; ``h``: (G#, G, G) blocks of X^T X, or None."""
    n, k = weight.shape
    parts = [_search_rows(weight[r], h, spec) for r in row_chunks(n, k)]  # float32 buffers of ~16 MiB
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _search_rows(weight: torch.Tensor, h: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """search_clip for some rows of a weight (every row's groups are searched independently)."""
    srch = _Search(weight, h, spec)
    dev = srch.wg.device
    best_c = torch.ones(srch.wg.shape[:2], device=dev)
    best = srch.errors(best_c)
    for c in COARSE.tolist():
        if c == 1.0:
            continue
        err = srch.errors(torch.tensor(c, device=dev))
        better = err < best
        best = torch.where(better, err, best)
        best_c = torch.where(better, c, best_c)
    center = best_c.clone()
    for d in FINE_STEPS:
        cand = (center + d).clamp(0.3, 1.0)
        err = srch.errors(cand)
        better = err < best
        best = torch.where(better, err, best)
        best_c = torch.where(better, cand, best_c)
    return best_c


@torch.no_grad()
def quantize_clipped(weight: torch.Tensor, spec: QuantSpec, clip: torch.Tensor) -> IntWeight:
    """Codes for ``weight`` with per-group clipping ``clip`` (alpha = beta = clip), fp16-exact scales."""
    if spec.kquant:
        clip = clip.to(weight.device)
        alpha, beta = kquant_fit(weight)
        return quantize_kquant(weight, clip * alpha, clip * beta).cpu()
    q = torch.empty(weight.shape, dtype=torch.uint8)
    scales, zeros = [], []
    for r in row_chunks(*weight.shape):
        srch = _Search(weight[r], None, spec)
        e, scale, zero = srch.codes(clip[r].to(srch.wg.device))
        q[r] = (e + zero.unsqueeze(-1)).reshape(-1, weight.shape[1]).to(torch.uint8).cpu()
        scales.append(scale.float().cpu())
        zeros.append(zero.to(torch.uint8).cpu())
    return IntWeight(q, torch.cat(scales), torch.cat(zeros), spec.group_size, spec.bits)
