"""Glue to the rest of the ecosystem: transformers (config + HfQuantizer) and optimum (OptimumQuantizer).

Importing this package makes transformers know the ``hubtool`` quantization method without paying for
``import transformers`` up front: if transformers' quantizer registry is already imported we register
now, otherwise a one-shot import hook registers right after transformers imports it (which it does on
the first ``from_pretrained``).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
from typing import Any

log = logging.getLogger(__name__)

_TARGET = "transformers.quantizers.auto"
_QUANTIZER = "hubtool.runtime.hf_quantizer"  # where the config, the HfQuantizer and register() live


def _register_now() -> None:
    module = sys.modules.get(_QUANTIZER)
    if module is not None and not hasattr(module, "register"):
        return  # it is being imported right now (it imports transformers); whoever imports it registers
    try:
        from .transformers import register

        register()
    except Exception as exc:  # never break `import hubtool` or transformers for a registration problem
        log.warning("could not register the hubtool quantizer with transformers: %s", exc)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds transformers' quantizer registry with the other finders and registers hubtool once it has run."""

    def find_spec(
        self, fullname: str, path: Any, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        """Wrap the real loader of ``transformers.quantizers.auto``; ignore every other module."""
        if fullname != _TARGET:
            return None
        _uninstall()
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        real_exec = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            real_exec(module)
            _register_now()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


_hook = _RegisterAfterImport()


def _uninstall() -> None:
    if _hook in sys.meta_path:
        sys.meta_path.remove(_hook)


def install() -> None:
    """Register hubtool with transformers now if its quantizer registry is loaded, else when it loads."""
    if _TARGET in sys.modules:
        _register_now()
    elif _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)


install()
