"""Which layers get quantized: the decoder blocks of the language model, and the linears inside them.

:func:`plan_layers` makes the :class:`QuantPlan` (blocks in order, each with its linears; every linear
left 16-bit with the reason); :func:`swap_module` replaces a submodule and returns the undo.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import nn

from ..core.spec import QuantSpec
from ..errors import HubtoolError
from ..record import SkippedLayer

# Parts of a module path that mark a non-language tower (kept 16-bit unless --quantize-vision).
VISION_MARKERS = (
    "vision",
    "visual",
    "image",
    "img",
    "siglip",
    "clip",
    "patch",
    "audio",
    "speech",
    "projector",
)


@dataclass
class BlockPlan:
    """One transformer block and the linears in it to quantize (names relative to the block)."""

    name: str
    linears: list[str]
    tower: str = "text"  # "text" | "vision"

    def full_names(self) -> list[str]:
        """Linears' names relative to the model."""
        return [f"{self.name}.{n}" for n in self.linears]


@dataclass
class QuantPlan:
    """Everything the quantizer will touch, in order, and every linear it leaves alone (with the reason)."""

    blocks: list[BlockPlan]
    skipped: list[SkippedLayer] = field(default_factory=list)
    block_lists: list[str] = field(default_factory=list)

    def linear_names(self) -> list[str]:
        """All linears to quantize, relative to the model."""
        return [n for b in self.blocks for n in b.full_names()]


def is_vision_path(name: str) -> bool:
    """Whether a module path lies in a vision/audio tower or projector."""
    return any(m in part for part in name.lower().split(".") for m in VISION_MARKERS)


def find_block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every ModuleList of identical blocks that hold linears (decoder layers, vision encoder layers)."""
    found = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        kinds = {type(child) for child in mod}
        if len(kinds) != 1 or not any(isinstance(m, nn.Linear) for m in mod[0].modules()):
            continue
        if any(name.startswith(prev + ".") for prev, _ in found):
            continue  # nested list inside a block already found
        found.append((name, mod))
    return found


def plan_layers(
    model: nn.Module,
    spec: QuantSpec,
    quantize_vision: bool = False,
    skip: str | None = None,
    keep: Mapping[str, str] | None = None,
) -> QuantPlan:
    """Decide which linears to quantize; the rest are listed in ``skipped`` with a reason.

    ``keep``: linears an export stores in another type (name -> why), left out of the int4 plan.
    """
    keep = keep or {}
    try:
        skip_re = re.compile(skip) if skip else None
    except re.error as exc:
        raise HubtoolError(f"--skip {skip!r} is not a valid regular expression: {exc}") from None
    lists = find_block_lists(model)
    text_lists = [(n, m) for n, m in lists if not is_vision_path(n)]
    if not text_lists:
        raise HubtoolError(
            f"no decoder blocks found in {type(model).__name__}",
            "hubtool quantizes transformer decoders with nn.Linear layers; this architecture is not supported",
        )
    plan = QuantPlan(blocks=[])
    chosen = {n for n, _ in text_lists} | ({n for n, _ in lists} if quantize_vision else set())
    in_blocks: set[str] = set()
    for list_name, mod in lists:
        tower = "vision" if is_vision_path(list_name) else "text"
        for i, block in enumerate(mod):
            block_name = f"{list_name}.{i}"
            names = []
            for sub, lin in block.named_modules():
                if not isinstance(lin, nn.Linear):
                    continue
                full = f"{block_name}.{sub}"
                in_blocks.add(full)
                reason = keep.get(full) or _skip_reason(full, lin, spec, skip_re, list_name in chosen)
                if reason:
                    plan.skipped.append(SkippedLayer(full, reason))
                else:
                    names.append(sub)
            if list_name in chosen and names:
                plan.blocks.append(BlockPlan(block_name, names, tower))
        if list_name in chosen:
            plan.block_lists.append(list_name)
    for name, lin in model.named_modules():
        if isinstance(lin, nn.Linear) and name not in in_blocks:
            plan.skipped.append(SkippedLayer(name, "outside the decoder blocks (kept 16-bit)"))
    if not plan.blocks:
        raise HubtoolError(
            "no linear layer can be quantized with this spec (all skipped)",
            f"see the reasons, e.g. {plan.skipped[0].name}: {plan.skipped[0].reason}"
            if plan.skipped
            else None,
        )
    return plan


def _skip_reason(
    name: str, lin: nn.Linear, spec: QuantSpec, skip_re: re.Pattern | None, chosen: bool
) -> str | None:
    if not chosen:
        return "vision tower (pass --quantize-vision to quantize it)"
    if skip_re is not None and skip_re.search(name):
        return f"matches --skip {skip_re.pattern!r}"
    if lin.in_features % spec.group_size:
        return f"input width {lin.in_features} is not a multiple of the group size {spec.group_size}"
    if lin.out_features % 32:
        return f"output width {lin.out_features} is not a multiple of 32 (GPTQ loaders pack zeros in 32-column words)"
    return None


def swap_module(root: nn.Module, name: str, new: nn.Module) -> Callable[[], None]:
    """Replace submodule ``name`` of ``root`` by ``new``; returns the undo."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, new)
    return lambda: setattr(parent, child, old)
