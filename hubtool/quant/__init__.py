"""Quantization: the spec, round-to-nearest, SignRound and the block-by-block driver."""
