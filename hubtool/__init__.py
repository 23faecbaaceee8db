"""hubtool: int4 models for the Hugging Face Hub.

``import hubtool`` registers the ``hubtool`` quantization method with transformers, so
``AutoModelForCausalLM.from_pretrained(dir)`` loads hubtool exports onto ``Int4Linear`` layers.
"""

from __future__ import annotations

from .__about__ import __version__
from .errors import HubtoolError

__all__ = ["__version__", "HubtoolError", "load", "HubtoolQuantizer", "Int4Linear"]


def load(path_or_id, **kwargs):
    """Load an int4 checkpoint (hubtool, auto_round or GPTQ) onto hubtool's Int4Linear layers."""
    from .runtime.loader import load_quantized

    return load_quantized(path_or_id, **kwargs)


def __getattr__(name: str):
    if name == "HubtoolQuantizer":
        from .integrations.optimum import HubtoolQuantizer

        return HubtoolQuantizer
    if name == "Int4Linear":
        from .runtime.int4linear import Int4Linear

        return Int4Linear
    raise AttributeError(name)


# Registers the `hubtool` quantization method with transformers as soon as transformers loads its
# quantizer registry (an import hook: `import hubtool` itself stays cheap).
from . import integrations as _integrations  # noqa: E402, F401
