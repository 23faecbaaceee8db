"""Quantization algorithms (floor 2: imports core, errors, record, kernels and itself only).

Entry point: :mod:`.driver` (``quantize_model``). Then, top down:

* :mod:`.runner` - the block runner: chains of blocks, placement (``--device-map``), memory, resume, progress;
* :mod:`.blockquant` - the per-block algorithm (reference, RTN, clipping search, tuning, keep-RTN);
* :mod:`.tuning` - SignRound's loop over one block; :mod:`.signround` - its fake quantization and SignSGD step;
* :mod:`.optrtn` - X^T X and the clipping search; :mod:`.rtn` - round-to-nearest; :mod:`.scales` - clipped,
  fp16-exact scales on core's scale math;
* :mod:`.qlinear` - a block's linears while quantized; :mod:`.capture` - block inputs; :mod:`.workdir` - resume;
* :mod:`.attention`, :mod:`.fused` - faster attention and elementwise ops for tuning on the CPU;
* :mod:`.layers` - which linears to quantize; :mod:`.calib` - calibration data; :mod:`.spec` - methods and
  recipes; :mod:`.result` - progress events and the result.
"""
