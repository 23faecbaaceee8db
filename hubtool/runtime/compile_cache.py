"""A static cache that compiles once on models with sliding-window layers (Gemma 2/3, Mistral-style).

transformers' ``StaticSlidingWindowLayer`` (5.x) keeps its length as a Python int (``cumulative_length_int``)
that its ``update``, ``get_mask_sizes`` and ``get_seq_length`` read inside the model's forward, so a
``torch.compile``d decode step (``generate(..., cache_implementation="static", compile_config=...)``) is
specialized on it and recompiles at every step until torch's recompile limit. ``StaticLayer``, used for
full-attention layers, keeps its length in a tensor and compiles once.

``static_cache_full_layers(model)`` gives a loaded model a ``_prepare_static_cache`` (its own, per instance)
that builds transformers' static cache and then replaces each sliding-window layer by a full-length
``StaticLayer``. The sliding window is still applied, by the attention mask (``masking_utils`` compares
absolute positions), so the tokens attended are the same; what changes is memory: past the window a
sliding layer holds the whole ``max_cache_len`` as a full layer does (Gemma 3 270M's window is 512 tokens).
Models without sliding layers, and a transformers without this private method, are left as they are.
"""

from __future__ import annotations

import logging
import types
from typing import Any

log = logging.getLogger(__name__)

SLIDING_TYPES = ("sliding_attention", "chunked_attention")


def full_static_layers(cache: Any, max_cache_len: int) -> Any:
    """Replace every ``StaticSlidingWindowLayer`` of a static cache by a full ``StaticLayer``; returns it."""
    from transformers.cache_utils import EncoderDecoderCache, StaticLayer, StaticSlidingWindowLayer

    inner = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
    for i, layer in enumerate(inner.layers):
        if type(layer) is StaticSlidingWindowLayer:
            full = StaticLayer(max_cache_len=max_cache_len)
            if layer.is_initialized:  # made early (transformers may initialize before the first update)
                full.lazy_initialization(layer.keys[:, :, :0], layer.values[:, :, :0])
            inner.layers[i] = full
    return cache


def _prepare_static_cache(self: Any, *args: Any, **kwargs: Any) -> Any:
    cache = type(self)._prepare_static_cache(self, *args, **kwargs)
    return full_static_layers(cache, self._previous_max_cache_length)  # the length transformers chose


def static_cache_full_layers(model: Any) -> bool:
    """Make ``generate(cache_implementation="static")`` on ``model`` build full static layers only (see the
    module); True when the model has sliding-window layers and got the method."""
    get = getattr(getattr(model, "config", None), "get_text_config", None)
    text = get(decoder=True) if callable(get) else None
    types_ = getattr(text, "layer_types", None) or ()
    if not any(t in SLIDING_TYPES for t in types_):
        return False
    if not hasattr(type(model), "_prepare_static_cache"):
        log.debug("%s has no _prepare_static_cache: its static cache stays as built", type(model).__name__)
        return False
    model._prepare_static_cache = types.MethodType(_prepare_static_cache, model)
    return True
