"""transformers integration: ``import hubtool`` registers hubtool's ``quant_method`` through ``register()``.

The config class, the HfQuantizer and the module swap live in ``runtime.hf_quantizer``, because loading
int4 (``hubtool.load``, compare, evaluate) needs them without this package; this module is the face
``integrations`` registers from, so ``AutoModelForCausalLM.from_pretrained(dir)`` loads hubtool exports
after ``import hubtool``.
"""

from __future__ import annotations

from ..runtime.hf_quantizer import QUANT_METHOD, HubtoolConfig, HubtoolHfQuantizer, register

__all__ = ["QUANT_METHOD", "HubtoolConfig", "HubtoolHfQuantizer", "register"]
