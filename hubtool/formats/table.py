"""The one table of per-format facts: what each export's config.json says, what loads it, how a card shows it.

Every format holds the same GPTQ v1 tensors (``core.packing``); a format is its config.json, its side
config file, whether it carries ``g_idx``, the library its users load it with, and the card's words.
``FORMATS`` is ordered: hubtool exports in this order, and publishing puts the first exported one on
``main``. The packing names are the ``packing_format`` values of a ``hubtool`` quantization_config.
"""

from __future__ import annotations

from dataclasses import dataclass

# GPTQ v1 stores zero-1 in each qzeros nibble; v2 (gptq_v2, auto-round's own "auto_round" packing) stores zero.
PACKING_V1 = "gptq"
PACKING_V2 = "gptq_v2"
# AWQ GEMM: qweight (K, N/8) and qzeros (G, N/8) packed along N in the order 0,2,4,6,1,3,5,7; zero as is.
PACKING_AWQ = "awq"
PACKINGS = (PACKING_V1, PACKING_V2, PACKING_AWQ)


@dataclass(frozen=True)
class FormatInfo:
    """Facts about one export format, from its config.json to its model card."""

    name: str  # the format's name in the CLI, hubtool.toml and the run record
    quant_method: str  # quantization_config.quant_method
    packing_format: str  # auto-round's packing_format, GPTQ's checkpoint_format, hubtool's packing_format
    with_g_idx: bool  # whether the checkpoint carries g_idx tensors
    side_config: str | None  # the quantization config written a second time for the format's own tools
    loads_with: str  # the library its users load it with (hubtool.load loads every format)
    card_label: str  # the format's name on the card
    card_install: str  # the card's install line
    card_import: str  # the import line the card's snippet needs ("" when none)
    hub_tag: str  # the Hub tag the format adds to the card


FORMATS: dict[str, FormatInfo] = {
    "auto_round": FormatInfo(
        name="auto_round",
        quant_method="auto-round",
        packing_format="auto_round:auto_gptq",
        with_g_idx=False,
        side_config="quantization_config.json",
        loads_with="auto-round",
        card_label="AutoRound",
        card_install="pip install transformers auto-round",
        card_import="",
        hub_tag="auto-round",
    ),
    "auto_gptq": FormatInfo(
        name="auto_gptq",
        quant_method="gptq",
        packing_format="gptq",
        with_g_idx=True,
        side_config="quantize_config.json",
        loads_with="gptqmodel",
        card_label="GPTQ",
        card_install="pip install transformers optimum gptqmodel",
        card_import="",
        hub_tag="gptq",
    ),
    "hubtool": FormatInfo(
        name="hubtool",
        quant_method="hubtool",
        packing_format=PACKING_V1,
        with_g_idx=False,
        side_config=None,
        loads_with="hubtool",
        card_label="hubtool",
        card_install="pip install hubtool",
        card_import='import hubtool  # registers the "hubtool" quantization method with transformers',
        hub_tag="hubtool",
    ),
}


# GGUF: one .gguf file per type, written by ``formats.gguf`` from the same codes (tuned in that type's spec);
# not exported unless asked (``--formats gguf:q4_0``, ``gguf:q4_k_m``), since each type's spec is its own.
GGUF_FORMATS: dict[str, FormatInfo] = {
    "gguf_q4_0": FormatInfo(
        name="gguf_q4_0",
        quant_method="gguf",
        packing_format="Q4_0",
        with_g_idx=False,
        side_config=None,
        loads_with="llama.cpp",
        card_label="GGUF Q4_0",
        card_install="pip install llama-cpp-python",
        card_import="",
        hub_tag="gguf",
    ),
}
GGUF_FORMATS["gguf_q4_k_m"] = FormatInfo(
    **{
        **GGUF_FORMATS["gguf_q4_0"].__dict__,
        "name": "gguf_q4_k_m",
        "packing_format": "Q4_K_M",
        "card_label": "GGUF Q4_K_M",
    }
)
ALL_FORMATS: dict[str, FormatInfo] = {**FORMATS, **GGUF_FORMATS}
