"""Optimized RTN: per group, the clipping of the range that minimizes the layer's output error.

For a linear with input activations X (tokens x K) the output error of a quantized weight Q is
``||X (W - Q)^T||^2 = sum_n e_n H e_n^T`` with ``H = X^T X`` and ``e_n`` the error of output row n.
Keeping only H's diagonal blocks (one G x G block per group) the error splits into independent
per-group terms ``e_{n,g} H_g e_{n,g}^T``, so every group can pick its own clipping factor from a grid in
one vectorized pass per candidate (a batched (N x G) @ (G x G) product per group column).
"""

from __future__ import annotations

import torch
from torch import nn

from .rtn import IntWeight, fp16_exact, group_view, quantize_with, scales_from_range
from .spec import QuantSpec

# Clipping factors tried (alpha = beta = c): a grid from 0.5 to 1, then a finer pass around the best.
COARSE = torch.linspace(0.5, 1.0, 26)
FINE_STEPS = (-0.0125, -0.00625, 0.00625, 0.0125)


class HessianCollector:
    """Accumulates ``X^T X`` (float32, on the activation's device) of each linear's input, padding masked."""

    def __init__(self, linears: dict[str, nn.Linear]):
        self.h: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self.mask: torch.Tensor | None = None  # (B, L) of the current batch, or None
        self._shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = [lin.register_forward_hook(self._hook(name)) for name, lin in linears.items()]

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
            if xtx is None:
                flat = x.detach().reshape(-1, x.shape[-1]).float()
                if self.mask is not None and self.mask.numel() == flat.shape[0]:
                    flat = flat[self.mask.reshape(-1).to(flat.device)]
                xtx = flat.T @ flat
                self._shared[key] = (x, xtx)  # x kept alive so that its id is not reused
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


def _group_blocks(h: torch.Tensor, g: int) -> torch.Tensor:
    """The (G#, G, G) diagonal blocks of a (K, K) matrix."""
    k = h.shape[0]
    n = k // g
    return h.reshape(n, g, n, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


def _errors(wg: torch.Tensor, hb: torch.Tensor | None, spec: QuantSpec, c: torch.Tensor) -> torch.Tensor:
    """Per-group output error (N, G#) of quantizing with clipping ``c`` (scalar or (N, G#))."""
    scale, zero = scales_from_range(wg, spec, c, c)
    scale = fp16_exact(scale)
    s3, z3 = scale.unsqueeze(-1), zero.unsqueeze(-1)
    q = torch.clamp(torch.round(wg / s3) + z3, 0, spec.qmax)
    e = wg - s3 * (q - z3)  # (N, G#, G)
    if hb is None:
        return (e * e).sum(-1)
    et = e.transpose(0, 1)  # (G#, N, G)
    return (torch.bmm(et, hb) * et).sum(-1).T


@torch.no_grad()
def search_clip(weight: torch.Tensor, h: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Per-group clipping factor (N, G#) minimizing the output error (weight error if ``h`` is None)."""
    wg = group_view(weight.detach(), spec.group_size)
    hb = _group_blocks(h.to(wg.device).float(), spec.group_size) if h is not None else None
    best_c = torch.ones(wg.shape[:2], device=wg.device)
    best = _errors(wg, hb, spec, best_c)
    for c in COARSE.tolist():
        if c == 1.0:
            continue
        err = _errors(wg, hb, spec, torch.tensor(c, device=wg.device))
        better = err < best
        best = torch.where(better, err, best)
        best_c = torch.where(better, torch.full_like(best_c, c), best_c)
    center = best_c.clone()
    for d in FINE_STEPS:
        cand = (center + d).clamp(0.3, 1.0)
        err = _errors(wg, hb, spec, cand)
        better = err < best
        best = torch.where(better, err, best)
        best_c = torch.where(better, cand, best_c)
    return best_c


def quantize_clipped(weight: torch.Tensor, spec: QuantSpec, clip: torch.Tensor) -> IntWeight:
    """Codes for ``weight`` with per-group clipping ``clip`` (alpha = beta = clip), fp16-exact scales."""
    wg = group_view(weight.detach(), spec.group_size)
    scale, zero = scales_from_range(wg, spec, clip.to(wg.device), clip.to(wg.device))
    iw = quantize_with(weight.detach(), spec, fp16_exact(scale), zero)
    return IntWeight(iw.q.cpu(), iw.scale.cpu(), iw.zero.cpu(), iw.group_size, iw.bits)
