"""The one place that knows how transformers versions differ: the KV cache's keyword, attribute and length.

transformers 5.0-5.2x pass the KV cache to models, decoder layers and ``generate`` as ``past_key_values``; newer
releases (5.24 on) call it ``cache`` and deprecate the old name (removed in 5.40 for ``forward``, 6.0 for
``generate``). sinkscope never spells either name anywhere else: it passes the cache through `cache_kwargs`,
finds the cache a model hands to a hook with `find_cache` (by type, whatever the keyword), and reads it back
from an output with `output_cache`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from transformers import Cache

#: the keyword of the KV cache, newest first
_CACHE_KEYWORDS = ("cache", "past_key_values")


@functools.lru_cache(maxsize=64)
def _keyword_of(fn: Callable[..., Any]) -> str:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins or C callables: assume the older, still accepted spelling
        return "past_key_values"
    return next((k for k in _CACHE_KEYWORDS if k in params), "past_key_values")


def cache_keyword(fn: Callable[..., Any]) -> str:
    """The keyword under which ``fn`` (a model's ``forward``) takes the KV cache.

    >>> def forward(input_ids, cache=None): ...
    >>> cache_keyword(forward)
    'cache'
    >>> def old_forward(input_ids, past_key_values=None): ...
    >>> cache_keyword(old_forward)
    'past_key_values'
    """
    fn = getattr(fn, "__func__", fn)  # bound methods: cache on the function
    return _keyword_of(fn)


def cache_kwargs(model: Any, cache: Cache | None) -> dict[str, Any]:
    """``{keyword: cache}`` for passing a KV cache to ``model(...)`` or ``model.generate(...)``.

    The keyword is the one the model's ``forward`` declares (``generate`` forwards it under the same name in every
    supported release). Example: ``model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache))``.
    """
    return {cache_keyword(model.forward): cache}


def find_cache(kwargs: Mapping[str, Any], args: tuple[Any, ...] = ()) -> Cache | None:
    """The KV cache among a call's arguments (a `transformers.Cache`, whatever its keyword), or None."""
    for name in _CACHE_KEYWORDS:
        value = kwargs.get(name)
        if isinstance(value, Cache):
            return value
    for value in (*kwargs.values(), *args):
        if isinstance(value, Cache):
            return value
    return None


def output_cache(output: Any) -> Cache | None:
    """The KV cache a model's output carries (``output.cache`` or ``output.past_key_values``), or None."""
    for name in _CACHE_KEYWORDS:
        value = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
        if isinstance(value, Cache):
            return value
    return None


def cached_length(cache: Cache | None) -> int:
    """Tokens the cache has seen before the current call (0 for None or an empty cache)."""
    if cache is None:
        return 0
    return int(cache.get_seq_length())


def attention_layer_types(text_config: Any) -> list[str]:
    """Each decoder layer's attention type (``"full_attention"``, ``"sliding_attention"``, ...), as the KV cache
    sees them. Uses transformers' own reader where the installed release has it (5.14 on), else the config's
    ``layer_types`` or, without one, ``sliding_window`` / ``attention_chunk_size`` as older releases did."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:
        get_layer_types_and_kwargs = None
    if get_layer_types_and_kwargs is not None:
        return list(get_layer_types_and_kwargs(text_config)[0])
    declared = getattr(text_config, "layer_types", None)
    if declared is not None:
        return list(declared)
    if getattr(text_config, "sliding_window", None) is not None:
        kind = "sliding_attention"
    elif getattr(text_config, "attention_chunk_size", None) is not None:
        kind = "chunked_attention"
    else:
        kind = "full_attention"
    return [kind] * int(text_config.num_hidden_layers)
