"""Sink + window KV cache (StreamingLLM, Xiao et al. 2023) on transformers' v5 Cache API, with RoPE re-rotation.

The cache keeps the first ``n_sink`` tokens plus the most recent ``window`` tokens of every attention layer, so its
memory is constant however long the stream grows. It is a plain :class:`transformers.Cache` built from
:class:`SinkWindowLayer` (a subclass of ``DynamicLayer``): pass it as the KV cache (``cache=`` on transformers >= 5.24,
``past_key_values=`` before; see `sinkscope.compat`) to ``model(...)`` or to
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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from transformers import Cache
from transformers.cache_utils import DynamicLayer

from sinkscope.compat import attention_layer_types, find_cache
from sinkscope.errors import InputError, UnsupportedArchitectureError

#: RoPE variants whose frequencies change with the sequence length: a fixed re-rotation would be wrong.
_POSITION_DEPENDENT_ROPE = ("dynamic", "longrope")


def _inv_freq(rotary: nn.Module) -> torch.Tensor:
    """A rotary embedding's ``inv_freq`` (rotary_dim / 2,)."""
    # cast: only modules whose ``inv_freq`` is a Tensor are taken for rotary embeddings (`RotaryShift.from_model`)
    return cast(torch.Tensor, rotary.inv_freq)


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
        return _inv_freq(self.rotary)  # (rotary_dim / 2,)

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
        if any(_inv_freq(m).shape != _inv_freq(first).shape or not torch.equal(_inv_freq(m), _inv_freq(first))
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
        self._cached_key = key
        self._cached_matrix: torch.Tensor = R.to(dtype)
        return self._cached_matrix

    def rotate(self, keys: torch.Tensor, delta: int | Sequence[int]) -> torch.Tensor:
        """Rotate cached keys (already at some RoPE position p) to position ``p + delta``.

        Shapes: ``keys`` (B, H_kv, K, D) -> same; only the first ``rotary_dim`` channels of D change. ``delta`` is
        one offset for every row, or one per row (B offsets; a row with offset 0 is returned unchanged).
        """
        if isinstance(delta, int):
            return keys @ self.matrix(delta, keys.shape[-1], keys.dtype, keys.device)
        deltas = list(delta)
        if len(set(deltas)) == 1:
            return keys @ self.matrix(deltas[0], keys.shape[-1], keys.dtype, keys.device)
        key = (tuple(deltas), keys.shape[-1], keys.dtype, keys.device)
        if getattr(self, "_rows_key", None) != key:  # all layers of one step share the per-row matrices
            eye = torch.eye(keys.shape[-1], dtype=keys.dtype, device=keys.device)
            mats = [self.matrix(d, keys.shape[-1], keys.dtype, keys.device) if d else eye for d in deltas]
            self._rows_key, self._rows_matrices = key, torch.stack(mats)[:, None]  # (B, 1, D, D)
        return keys @ self._rows_matrices


class SinkWindowLayer(DynamicLayer):
    """One layer's cache: the first ``n_sink`` tokens plus the last ``window`` tokens of every row.

    Stored ``keys``/``values``: (B, H_kv, min(seen, n_sink + window), D). ``get_seq_length()`` is the number of
    tokens seen (absolute position of the next token, padding included), like HF's sliding-window layers.

    Rows and left padding. Each row keeps its own first ``n_sink`` *real* tokens and its last ``window`` tokens,
    right-aligned in the stored slots: a row with ``n`` real tokens seen holds them in the last ``min(n, capacity)``
    slots (``[sinks, window]`` once it is full); the slots before them hold padding or stale keys, which the model's
    2D padding mask hides (stored slot ``j`` is laid out at position ``seen - stored + j``, and a left-padded row is
    real exactly from its first real token on). The cache learns which new tokens are real from the ``attention_mask``
    that `sink_cache`'s forward pre-hook hands it (`SinkWindowCache.observe_attention_mask`); without a mask every
    token counts as real. A batch whose rows have equal lengths behaves exactly like one row.

    Args:
        n_sink: tokens kept from the start of the stream (0: a window-only cache).
        window: most recent tokens kept (>= 1).
        rotary: if given, positions are re-assigned by cache slot (sinks re-rotated by the row's evicted count); if
            ``None``, tokens keep their absolute positions.
    """

    is_sliding = False
    is_croppable = True  # `crop` is exact until the first eviction and refuses (one line) afterwards

    def __init__(self, n_sink: int, window: int, rotary: RotaryShift | None = None, **kwargs: Any) -> None:
        super().__init__()
        if n_sink < 0 or window < 1:
            raise InputError(f"need n_sink >= 0 and window >= 1, got n_sink={n_sink}, window={window}")
        self.n_sink = n_sink
        self.window = window
        self.rotary = rotary
        self.cumulative_length = 0  # tokens seen, padding included
        self.real: list[int] = []  # per row: real (non-padding) tokens seen
        self.pending_real: list[int] | None = None  # per row: real tokens among the next update's (None: all)
        self._ring = False  # single-token ring-buffer mode (see `_ring_step`)
        self._free = 0
        self._sink_keys: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.n_sink + self.window

    @property
    def stored_tokens(self) -> int:
        """Token slots held now (<= capacity)."""
        if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
            return 0
        return self.capacity if self._ring else self.keys.shape[-2]

    @property
    def evicted_rows(self) -> list[int]:
        """Per row: real tokens dropped from between its sinks and its window."""
        return [max(0, n - self.capacity) for n in self.real]

    @property
    def evicted(self) -> int:
        """Tokens evicted from the longest row (the only row of an unbatched stream)."""
        return max(self.evicted_rows, default=0)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new states, return what the new queries attend to, then evict down to the capacity.

        Shapes: ``key_states``/``value_states`` (B, H_kv, Q, D); returns (B, H_kv, stored + Q, D).
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, q = key_states.shape[0], key_states.shape[-2]
        if len(self.real) != B:
            if self.cumulative_length:
                raise InputError(f"the sink cache holds {len(self.real)} rows, this forward has {B}")
            self.real = [0] * B
        new_real, self.pending_real = self.pending_real or [q] * B, None
        shifts = self.evicted_rows  # evicted before this forward: how far each row's sinks sit beyond slot distance
        if q == 1 and min(new_real) == 1 and (
                self._ring or (self.stored_tokens == self.capacity and min(self.real) >= self.capacity)):
            return self._ring_step(key_states, value_states, shifts)
        if self._ring:
            self._linearize()
        assert self.keys is not None and self.values is not None  # set by lazy_initialization
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        held = [min(n, self.capacity) + r for n, r in zip(self.real, new_real)]  # real tokens in `keys`, per row
        self.cumulative_length += q
        self.real = [n + r for n, r in zip(self.real, new_real)]
        n, s, kept = keys.shape[-2], self.n_sink, min(self.cumulative_length, self.capacity)
        if n > kept:
            self.keys, self.values = self._evict(keys, values, held, kept)
        else:
            self.keys, self.values = keys, values
        if self.rotary is not None and s > 0 and max(shifts) > 0:
            # a row evicted before, so this forward evicted too and `keys` is not aliased by `self.keys`
            keys[..., :s, :] = self.rotary.rotate(keys[..., :s, :], shifts)
        return keys, values

    def _evict(self, keys: torch.Tensor, values: torch.Tensor, held: list[int], kept: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep ``kept`` slots per row: its sinks + last ``window`` tokens once it holds more than the capacity,
        else its last ``kept`` slots (all its real tokens, right-aligned). Shapes: (B, H, n, D) -> (B, H, kept, D)."""
        n, s = keys.shape[-2], self.n_sink
        rows = [(*range(n - h, n - h + s), *range(n - self.window, n)) if h > self.capacity
                else tuple(range(n - kept, n)) for h in held]
        if len(set(rows)) == 1:  # every row alike (no padding): slices, no gather
            idx = rows[0]
            if idx == tuple(range(n - kept, n)):
                return keys[..., n - kept:, :], values[..., n - kept:, :]
            return (torch.cat([keys[..., :s, :], keys[..., n - self.window:, :]], dim=-2),
                    torch.cat([values[..., :s, :], values[..., n - self.window:, :]], dim=-2))
        index = torch.tensor(rows, device=keys.device)[:, None, :, None]  # (B, 1, kept, 1)
        return (keys.gather(-2, index.expand(-1, keys.shape[1], -1, keys.shape[-1])),
                values.gather(-2, index.expand(-1, values.shape[1], -1, values.shape[-1])))

    # Single-token steps on a full cache use a ring buffer of capacity + 1 slots, so a step writes one token
    # instead of copying the whole cache: slots [0, n_sink) hold the sinks, the other window + 1 slots hold the
    # window plus one free slot that the new token takes; the oldest window token's slot is freed afterwards.
    # With one query every key is visible, so the keys' order in the buffer does not matter. Only entered when every
    # row is full (no padding slots left).

    def _ring_step(self, key_states: torch.Tensor, value_states: torch.Tensor, shifts: list[int]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.n_sink
        keys, values = self.keys, self.values
        assert keys is not None and values is not None  # a full cache (or ring) holds tensors
        if not self._ring:  # enter ring mode: window in slots [s, capacity), free slot at the end
            keys = self.keys = torch.cat([keys, torch.empty_like(key_states)], dim=-2)
            values = self.values = torch.cat([values, torch.empty_like(value_states)], dim=-2)
            self._sink_keys = keys[..., :s, :].clone() if self.rotary is not None else None
            self._free, self._ring = self.capacity, True
        free = self._free
        keys[..., free:free + 1, :] = key_states
        values[..., free:free + 1, :] = value_states
        if self._sink_keys is not None and s > 0 and max(shifts) > 0:
            assert self.rotary is not None  # sink keys are kept only for re-rotation
            keys[..., :s, :] = self.rotary.rotate(self._sink_keys, shifts)
        self.cumulative_length += 1
        self.real = [n + 1 for n in self.real]  # each row's oldest window token is dropped after this step
        self._free = s + (free - s + 1) % (self.window + 1)
        return keys, values

    def _linearize(self) -> None:
        """Leave ring mode: stored = [sinks (original rotation), window oldest..newest], no free slot."""
        s, free = self.n_sink, self._free
        assert self.keys is not None and self.values is not None  # ring mode holds tensors
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

    def crop(self, max_length: int) -> None:
        """Forget the last tokens: ``crop(-n)`` removes ``n`` (transformers >= 5.24), ``crop(m)`` keeps the first ``m``
        (earlier releases). Exact while no row has evicted anything; afterwards the evicted tokens a shorter stream
        would hold again are gone, so it raises `InputError`. ``crop(0)`` (5.24) does nothing."""
        remove = -max_length if max_length < 0 else (self.cumulative_length - max_length if max_length else 0)
        if remove <= 0 or not self.is_initialized:
            return
        if remove > min(self.real, default=0):
            raise InputError(f"cannot remove {remove} tokens from a sink cache row holding {min(self.real)}")
        if self.evicted:
            raise InputError(
                f"cannot remove the last {remove} tokens from the sink + window cache: it already evicted "
                f"{self.evicted} tokens that the shorter stream needs back; assisted/speculative decoding (crop) works "
                f"only while the stream fits in n_sink + window = {self.capacity} tokens")
        if self._ring:
            self._linearize()
        assert self.keys is not None and self.values is not None  # initialised (checked above)
        stored, self.cumulative_length = self.keys.shape[-2], self.cumulative_length - remove
        self.real = [n - remove for n in self.real]
        keys, values = self.keys[..., :stored - remove, :], self.values[..., :stored - remove, :]
        if (gap := min(self.cumulative_length, self.capacity) - keys.shape[-2]) > 0:  # padded rows: keep right-aligned
            pad = keys.new_zeros(*keys.shape[:-2], gap, keys.shape[-1])
            keys, values = torch.cat([pad, keys], dim=-2), torch.cat([pad, values], dim=-2)
        self.keys, self.values = keys, values

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        order = beam_idx.tolist()
        self.real = [self.real[i] for i in order]
        if self._sink_keys is not None:
            self._sink_keys = self._sink_keys.index_select(0, beam_idx.to(self._sink_keys.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.real = [n for n in self.real for _ in range(repeats)]
        if self._sink_keys is not None:
            self._sink_keys = self._sink_keys.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.real = [self.real[i] for i in indices.tolist()]
        if self._sink_keys is not None:
            self._sink_keys = self._sink_keys[indices]

    def reset(self) -> None:
        super().reset()
        self.cumulative_length, self.real, self.pending_real = 0, [], None
        self._ring, self._sink_keys = False, None


class SinkWindowCache(Cache):
    """A :class:`transformers.Cache` of :class:`SinkWindowLayer`, one per decoder layer.

    Args:
        config: the model config (its decoder text config gives the layer count and types).
        n_sink: tokens kept from the start (attention sinks).
        window: most recent tokens kept.
        rotary: a :class:`RotaryShift` to re-assign positions by slot; ``None`` for the plain variant.

    Raises:
        UnsupportedArchitectureError: the model has sliding-window or linear-attention layers.

    >>> from sinkscope.models.random_hf import tiny_model
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
    def _sink_layers(self) -> list[SinkWindowLayer]:
        """``self.layers``, typed: `__init__` builds one `SinkWindowLayer` per decoder layer."""
        return cast(list[SinkWindowLayer], self.layers)  # cast: see above; Cache types them as any layer kind

    @property
    def stored_tokens(self) -> int:
        """Token slots currently held by the first layer."""
        return self._sink_layers[0].stored_tokens

    @property
    def evicted(self) -> int:
        return self._sink_layers[0].evicted

    def observe_attention_mask(self, attention_mask: torch.Tensor | None, n_new: int) -> None:
        """Tell the layers which of the next forward's ``n_new`` tokens are real (left padding).

        ``attention_mask``: the model's 2D mask (B, seen + n_new), 1 for real tokens; ``None`` or a 4D mask: every
        token counts as real. Raises `InputError` for a mask of the wrong length or padding after a real token (only
        left padding is supported)."""
        for layer in self._sink_layers:
            layer.pending_real = None
        if attention_mask is None or attention_mask.dim() != 2:
            return
        seen = self.get_seq_length()
        if attention_mask.shape[-1] != seen + n_new:
            raise InputError(f"attention_mask covers {attention_mask.shape[-1]} tokens, but the sink cache has seen "
                             f"{seen} and this forward adds {n_new}: pass the mask of every token so far")
        new = attention_mask[:, seen:].bool()  # (B, n_new)
        if bool(new.all()):
            return
        started = torch.tensor([n > 0 for n in self._sink_layers[0].real]) if self._sink_layers[0].real \
            else attention_mask[:, :seen].bool().any(-1).cpu()
        steps_down = (new[:, 1:].int() - new[:, :-1].int() < 0).any(-1).cpu()
        bad = steps_down | (started & ~new.all(-1).cpu())
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise InputError(f"the sink cache supports left padding only: row {row} of the attention mask has "
                             "padding after a real token")
        real = new.sum(-1).tolist()
        for layer in self._sink_layers:
            layer.pending_real = real


def _padding_pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Forward pre-hook: hand the 2D ``attention_mask`` to a `SinkWindowCache` passed to this forward."""
    cache = find_cache(kwargs, args)
    if not isinstance(cache, SinkWindowCache):
        return
    new = kwargs.get("input_ids")
    if new is None:
        new = kwargs.get("inputs_embeds")
    if new is None and args and isinstance(args[0], torch.Tensor):
        new = args[0]
    if new is not None:
        cache.observe_attention_mask(kwargs.get("attention_mask"), int(new.shape[1]))


def install_padding_hook(model: nn.Module) -> None:
    """Once per model: a forward pre-hook that tells sink caches which tokens are left padding (see
    `SinkWindowCache.observe_attention_mask`). It does nothing for calls without a sink cache."""
    if not getattr(model, "_sinkscope_padding_hook", False):
        model.register_forward_pre_hook(_padding_pre_hook, with_kwargs=True)
        model._sinkscope_padding_hook = True  # type: ignore[assignment]  # Module.__setattr__ is typed Tensor | Module


def sink_cache(model: nn.Module, n_sink: int = 4, window: int = 1020, *, reassign: bool = True) -> SinkWindowCache:
    """A sink + window cache for ``model`` (``n_sink=0``: window only).

    Args:
        model: a Hugging Face causal LM (full-attention layers; RoPE if ``reassign``).
        n_sink: first tokens to keep (StreamingLLM uses 4).
        window: most recent tokens to keep.
        reassign: re-assign positions by cache slot (StreamingLLM) instead of keeping absolute positions.
    """
    rotary = RotaryShift.from_model(model) if reassign and n_sink > 0 else None
    install_padding_hook(model)
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
