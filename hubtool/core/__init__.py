"""Floor 0: the types and math every other floor shares (spec, integer weights and the scale math, GPTQ
packing, atomic file writes). Nothing here imports from another hubtool floor."""
