"""Sink + window KV cache (StreamingLLM, Xiao et al. 2023) on transformers' v5 Cache API, with RoPE re-rotation.

The cache keeps the first ``n_sink`` tokens plus the most recent ``window`` tokens of every attention layer, so its
memory is constant however long the stream grows. It is a plain :class:`transformers.Cache` built from
:class:`SinkWindowLayer` (a subclass of ``DynamicLayer``): pass it as the KV cache (``cache=`` on transformers >= 5.24, ``past_key_values=`` before; see `sinkscope.compat`) to ``model(...)`` or to
``model.generate(...)``; no model code is patched.

Positions. Models call ``past_key_values.update(k, v, layer_idx)`` with keys that are already rotated (RoPE) at the
token's absolute position (``get_seq_length()`` counts every token seen, so the model and ``generate`` both assign
absolute positions). Two variants:

* ``reassign=False`` (plain): tokens keep their absolute positions; evicting only drops the middle of the cache.
  The query-to-sink distance grows with the stream and eventually exceeds the trained context.
* ``reassign=True`` (StreamingLLM): positions are re-assigned by cache slot -- sinks at slots ``0..n_sink-1``, the
  window right after them, the new token after the window -- so no distance ever exceeds ``n_sink + window``.
  RoPE scores depend only on the query-key distance, and window keys already sit at the right distance from the
  query (the window slides with it); only the sinks are ``evicted`` positions too far away. The layer keeps the sink
  keys as rotated at their original positions and, for each forward, returns them rotated forward by the number of
  evicted tokens (an exact composition of rotations; the stored copy is never re-rotated, so no rounding builds up).
  Partial RoPE (rotary dim < head dim) and GQA (``n_kv_heads < n_heads``) are handled: the rotation acts on the
  first ``rotary_dim`` channels of every kv head, the same channels the model rotates.

Within one forward of ``q`` tokens (a prefill chunk), every query sees the cache plus the earlier tokens of the
chunk, i.e. up to ``n_sink + window + q - 1`` keys; token-by-token (``q = 1``) the policy is exact. Prefill long
prompts in chunks (``generate(..., prefill_chunk_size=...)`` or :func:`sinkscope.streaming.generate.prefill`) so the
transient attention stays bounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import Cache
from transformers.cache_utils import DynamicLayer

from sinkscope.compat import attention_layer_types
from sinkscope.errors import InputError, UnsupportedArchitectureError

#: RoPE variants whose frequencies change with the sequence length: a fixed re-rotation would be wrong.
_POSITION_DEPENDENT_ROPE = ("dynamic", "longrope")


@dataclass
class RotaryShift:
    """Rotates cached keys by a position offset, with the model's own RoPE frequencies.

    Attributes:
        rotary: the model's rotary-embedding module (its ``inv_freq`` buffer is read at every call, so it follows
            the module across devices and dtypes).
    """

    rotary: nn.Module

    @property
    def inv_freq(self) -> torch.Tensor:
        return self.rotary.inv_freq  # (rotary_dim / 2,)

    @property
    def rotary_dim(self) -> int:
        return 2 * int(self.inv_freq.shape[-1])

    @classmethod
    def from_model(cls, model: nn.Module) -> RotaryShift:
        """Find the model's rotary embedding (the module with an ``inv_freq`` buffer).

        Raises:
            UnsupportedArchitectureError: the model has no RoPE, several different ones, or a length-dependent RoPE.
        """
        found: list[nn.Module] = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
        if not found:
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} has no rotary position embedding: position re-assignment needs a RoPE "
                "model (use reassign=False / the plain variant)")
        first = found[0]
        if any(m.inv_freq.shape != first.inv_freq.shape or not torch.equal(m.inv_freq, first.inv_freq)
               for m in found[1:]):
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} uses several rotary embeddings; position re-assignment supports one")
        rope_type = getattr(first, "rope_type", "default")
        if rope_type in _POSITION_DEPENDENT_ROPE:
            raise UnsupportedArchitectureError(
                f"RoPE type {rope_type!r} changes its frequencies with the sequence length; "
                "use the plain variant (reassign=False)")
        return cls(first)

    def matrix(self, delta: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The (D, D) matrix ``R`` with ``k @ R`` = ``k`` rotated by ``delta`` positions (HF ``rotate_half``
        pairing of channel ``i`` with ``i + rotary_dim/2``; channels past ``rotary_dim`` pass through).

        Angles ``delta * inv_freq`` are computed in float64; no ``attention_scaling`` (keys carry it once). The
        last matrix is cached, so all layers of one step share it.
        """
        key = (delta, head_dim, dtype, device)
        if getattr(self, "_cached_key", None) == key:
            return self._cached_matrix
        h = self.rotary_dim // 2
        angles = float(delta) * self.inv_freq.detach().to(device=device, dtype=torch.float64)  # (h,)
        cos, sin = angles.cos(), angles.sin()
        R = torch.eye(head_dim, dtype=torch.float64, device=device)
        i = torch.arange(h, device=device)
        R[i, i] = cos
        R[i + h, i + h] = cos
        R[i + h, i] = -sin
        R[i, i + h] = sin
        self._cached_key, self._cached_matrix = key, R.to(dtype)
        return self._cached_matrix

    def rotate(self, keys: torch.Tensor, delta: int) -> torch.Tensor:
        """Rotate keys (already at some RoPE position p) to position ``p + delta``.

        Shapes: ``keys`` (B, H_kv, K, D) -> same; only the first ``rotary_dim`` channels of D change.
        """
        return keys @ self.matrix(delta, keys.shape[-1], keys.dtype, keys.device)


class SinkWindowLayer(DynamicLayer):
    """One layer's cache: the first ``n_sink`` tokens plus the last ``window`` tokens.

    Stored ``keys``/``values``: (B, H_kv, min(seen, n_sink + window), D), sinks first. ``get_seq_length()`` is the
    number of tokens seen (absolute position of the next token), like HF's sliding-window layers.

    Args:
        n_sink: tokens kept from the start of the stream (0: a window-only cache).
        window: most recent tokens kept (>= 1).
        rotary: if given, positions are re-assigned by cache slot (sinks re-rotated by the evicted count); if
            ``None``, tokens keep their absolute positions.
    """

    is_sliding = False
    is_croppable = False

    def __init__(self, n_sink: int, window: int, rotary: RotaryShift | None = None, **kwargs: Any) -> None:
        super().__init__()
        if n_sink < 0 or window < 1:
            raise InputError(f"need n_sink >= 0 and window >= 1, got n_sink={n_sink}, window={window}")
        self.n_sink = n_sink
        self.window = window
        self.rotary = rotary
        self.cumulative_length = 0  # tokens seen
        self.evicted = 0  # tokens dropped from between the sinks and the window
        self._ring = False  # single-token ring-buffer mode (see `_ring_step`)
        self._free = 0
        self._sink_keys: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.n_sink + self.window

    @property
    def stored_tokens(self) -> int:
        """Tokens held now (<= capacity)."""
        if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
            return 0
        return self.capacity if self._ring else self.keys.shape[-2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new states, return what the new queries attend to, then evict down to the capacity.

        Shapes: ``key_states``/``value_states`` (B, H_kv, Q, D); returns (B, H_kv, stored + Q, D).
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        if q == 1 and (self._ring or self.stored_tokens == self.capacity):
            return self._ring_step(key_states, value_states)
        if self._ring:
            self._linearize()
        shift = self.evicted  # evicted before this forward: how far the sinks sit beyond their slot distance
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        self.cumulative_length += q
        n, s = keys.shape[-2], self.n_sink
        if n > self.capacity:
            self.keys = torch.cat([keys[..., :s, :], keys[..., n - self.window:, :]], dim=-2)
            self.values = torch.cat([values[..., :s, :], values[..., n - self.window:, :]], dim=-2)
            self.evicted += n - self.capacity
        else:
            self.keys, self.values = keys, values
        if self.rotary is not None and shift > 0 and s > 0:
            # shift > 0 means the cache was full, so this forward evicted and `keys` is not aliased by `self.keys`
            keys[..., :s, :] = self.rotary.rotate(keys[..., :s, :], shift)
        return keys, values

    # Single-token steps on a full cache use a ring buffer of capacity + 1 slots, so a step writes one token
    # instead of copying the whole cache: slots [0, n_sink) hold the sinks, the other window + 1 slots hold the
    # window plus one free slot that the new token takes; the oldest window token's slot is freed afterwards.
    # With one query every key is visible, so the keys' order in the buffer does not matter.

    def _ring_step(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.n_sink
        if not self._ring:  # enter ring mode: window in slots [s, capacity), free slot at the end
            self.keys = torch.cat([self.keys, torch.empty_like(key_states)], dim=-2)
            self.values = torch.cat([self.values, torch.empty_like(value_states)], dim=-2)
            self._sink_keys = self.keys[..., :s, :].clone() if self.rotary is not None else None
            self._free, self._ring = self.capacity, True
        free = self._free
        self.keys[..., free:free + 1, :] = key_states
        self.values[..., free:free + 1, :] = value_states
        if self.rotary is not None and s > 0 and self.evicted > 0:
            self.keys[..., :s, :] = self.rotary.rotate(self._sink_keys, self.evicted)
        self.cumulative_length += 1
        self.evicted += 1  # the oldest window token, in the next slot of the ring, is dropped after this step
        self._free = s + (free - s + 1) % (self.window + 1)
        return self.keys, self.values

    def _linearize(self) -> None:
        """Leave ring mode: stored = [sinks (original rotation), window oldest..newest], no free slot."""
        s, free = self.n_sink, self._free
        order = [*range(s), *(s + (free - s + 1 + j) % (self.window + 1) for j in range(self.window))]
        idx = torch.tensor(order, device=self.keys.device)
        keys = self.keys.index_select(-2, idx)
        if self._sink_keys is not None:
            keys[..., :s, :] = self._sink_keys
        self.keys, self.values = keys, self.values.index_select(-2, idx)
        self._ring, self._sink_keys = False, None

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        """(kv_length, kv_offset) for the causal mask: the stored keys precede every query, so they are laid out
        as the ``stored`` positions right before the query (all visible), the new keys causally after.

        ``query_length``: the number of new tokens (transformers >= 5.24) or their ``cache_position`` tensor
        (earlier releases)."""
        if isinstance(query_length, torch.Tensor):
            query_length = int(query_length.shape[0])
        stored = self.stored_tokens
        return stored + query_length, self.cumulative_length - stored

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1  # the stream has no maximum length

    def get_max_cache_shape(self) -> int:
        return -1  # transformers < 5.24 asks under this name

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a sink+window cache cannot be cropped (evicted tokens are gone)")

    def reset(self) -> None:
        super().reset()
        self.evicted, self._ring, self._sink_keys = 0, False, None


class SinkWindowCache(Cache):
    """A :class:`transformers.Cache` of :class:`SinkWindowLayer`, one per decoder layer.

    Args:
        config: the model config (its decoder text config gives the layer count and types).
        n_sink: tokens kept from the start (attention sinks).
        window: most recent tokens kept.
        rotary: a :class:`RotaryShift` to re-assign positions by slot; ``None`` for the plain variant.

    Raises:
        UnsupportedArchitectureError: the model has sliding-window or linear-attention layers.

    >>> from sinkscope.models.tiny import tiny_model
    >>> m = tiny_model("llama")
    >>> cache = sink_cache(m, n_sink=2, window=4)
    >>> from sinkscope.compat import cache_kwargs
    >>> _ = m(torch.arange(3, 13)[None], **cache_kwargs(m, cache))
    >>> cache.get_seq_length(), cache.stored_tokens, cache.evicted
    (10, 6, 4)
    """

    def __init__(self, config: Any, n_sink: int, window: int, rotary: RotaryShift | None = None) -> None:
        text = config.get_text_config(decoder=True)
        layer_types = attention_layer_types(text)
        if any(t != "full_attention" for t in layer_types):
            raise UnsupportedArchitectureError(
                f"{text.model_type} has non-full-attention layers ({sorted(set(layer_types))}); "
                "the sink cache supports full-attention models only")
        self.n_sink, self.window, self.reassign = n_sink, window, rotary is not None
        super().__init__(layers=[SinkWindowLayer(n_sink, window, rotary) for _ in layer_types])

    @property
    def stored_tokens(self) -> int:
        """Tokens currently held by the first layer."""
        return self.layers[0].stored_tokens

    @property
    def evicted(self) -> int:
        return self.layers[0].evicted


def sink_cache(model: nn.Module, n_sink: int = 4, window: int = 1020, *, reassign: bool = True) -> SinkWindowCache:
    """A sink + window cache for ``model`` (``n_sink=0``: window only).

    Args:
        model: a Hugging Face causal LM (full-attention layers; RoPE if ``reassign``).
        n_sink: first tokens to keep (StreamingLLM uses 4).
        window: most recent tokens to keep.
        reassign: re-assign positions by cache slot (StreamingLLM) instead of keeping absolute positions.
    """
    rotary = RotaryShift.from_model(model) if reassign and n_sink > 0 else None
    return SinkWindowCache(model.config, n_sink, window, rotary)


def kv_cache_bytes(cache: Cache | None) -> int:
    """Bytes held by the key/value tensors of every layer of ``cache`` (0 for ``None``)."""
    if cache is None:
        return 0
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
