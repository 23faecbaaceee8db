"""The weight math works on row chunks (bounded float32 temporaries): the same bits as in one piece."""

from __future__ import annotations

import pytest
import torch

from hubtool.core import intweight
from hubtool.core.spec import QuantSpec
from hubtool.quant.optrtn import quantize_clipped, search_clip
from hubtool.quant.rtn import quantize_rtn


@pytest.mark.parametrize("sym", [True, False])
def test_chunked_weight_math_gives_the_same_bits(monkeypatch, sym):
    torch.manual_seed(0)
    spec = QuantSpec(bits=4, group_size=32, sym=sym)
    w = (torch.randn(203, 256) * torch.rand(203, 1)).to(torch.bfloat16)  # 203 rows: chunks end unevenly
    x = torch.randn(8, 64, 32)  # (G#, tokens, G)
    h = torch.bmm(x.transpose(1, 2), x)  # (G#, G, G) blocks of X^T X

    def run():
        codes = quantize_rtn(w, spec)
        clip = search_clip(w, h, spec)
        clipped = quantize_clipped(w, spec, clip)
        return codes, clip, clipped, codes.dequantize(torch.bfloat16), clipped.dequantize()

    whole = run()
    monkeypatch.setattr(intweight, "CHUNK_ELEMENTS", 7 * 256)  # 7 rows per chunk
    chunked = run()
    assert intweight.row_chunks(203, 256)[-1] == slice(196, 203)
    for a, b in zip(whole, chunked, strict=True):
        if isinstance(a, intweight.IntWeight):
            for f in ("q", "scale", "zero"):
                assert torch.equal(getattr(a, f), getattr(b, f)), f
        else:
            assert torch.equal(a, b)
    # and the codes are RTN's definition, computed here in one float32 piece
    wg = w.float().reshape(203, 8, 32)
    scale, zero = intweight.scales_from_range(wg, spec)
    want = torch.clamp(
        torch.round(wg / intweight.fp16_exact(scale).unsqueeze(-1)) + zero.unsqueeze(-1), 0, 15
    )
    assert torch.equal(whole[0].q, want.reshape(203, 256).to(torch.uint8))
