"""The head-wise KV cache: full heads keep every token, streaming heads keep sinks + window, in smaller tensors.

`headwise_cache(model, policy)` returns a :class:`transformers.Cache` (pass it as the model's KV cache through
`sinkscope.compat.cache_kwargs`, to ``model(...)`` or ``model.generate(...)``). Each layer stores

* ``keys``/``values``: (B, n_full, T, D), the layer's full-cache kv heads, every token seen;
* ``stream_keys``/``stream_values``: (B, n_stream, min(T, n_sink + window), D), its streaming kv heads' sinks and
  last ``window`` tokens, with their absolute positions ``stream_pos``.

So the stored bytes are the policy's (`KVPolicy.bytes_fraction`), not a mask over a dense cache: `stored_bytes`
counts the tensors' real bytes. Tokens keep their absolute positions (the model rotates keys at their position;
nothing is re-rotated), the plain variant of the sink cache.

Attention: the layer's ``update`` returns the full heads' keys carrying a `SplitKV` with the streaming set; the
model runs the ``"sinkscope_kv"`` attention function (`sinkscope.kv.attention.headwise_attention`, switched on by
`headwise_cache`), which attends each set on its own query heads. Within a forward of ``Q`` tokens (a chunk of a
chunked prefill) every streaming-head query sees exactly its sinks and its own last ``window`` keys (a per-query
band mask), so any chunking computes the same as token by token and as the dense per-head-masked forward.

Batches: rows without padding work (every row holds the same positions); a padded batch is refused in one line
(run rows one at a time). Beam search reorders both sets; ``crop`` (assisted decoding) is refused once a streaming
head has evicted a token.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn
from transformers import Cache
from transformers.cache_utils import DynamicLayer

from sinkscope.compat import find_cache
from sinkscope.errors import InputError
from sinkscope.kv.attention import SplitKV, use_headwise_attention
from sinkscope.kv.policy import KVPolicy


def _select(x: Tensor, heads: tuple[int, ...], n: int) -> Tensor:
    """``x[:, heads]`` (B, n, ...) -> (B, len(heads), ...), contiguous, for new states."""
    if len(heads) == n:
        return x
    if heads and heads == tuple(range(heads[0], heads[0] + len(heads))):
        return x[:, heads[0]:heads[0] + len(heads)]
    return x[:, list(heads)]


class HeadwiseLayer(DynamicLayer):
    """One layer of the head-wise cache (see the module docstring for the stored tensors).

    Args:
        full_heads: the layer's full-cache kv heads.
        n_kv_heads: kv heads of the layer.
        n_sink, window: what each streaming head keeps.
    """

    is_sliding = False
    is_croppable = True

    def __init__(self, full_heads: tuple[int, ...], n_kv_heads: int, n_sink: int, window: int) -> None:
        super().__init__()
        self.full_heads = tuple(full_heads)
        self.stream_heads = tuple(h for h in range(n_kv_heads) if h not in set(full_heads))
        self.n_kv_heads, self.n_sink, self.window = n_kv_heads, n_sink, window
        self.cumulative_length = 0
        self.stream_keys: Tensor | None = None
        self.stream_values: Tensor | None = None
        self.stream_pos: Tensor | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        B, _, _, D = key_states.shape
        self.device = key_states.device
        dtype, device, Dv = key_states.dtype, self.device, value_states.shape[-1]
        self.keys = torch.empty(B, len(self.full_heads), 0, D, dtype=dtype, device=device)
        self.values = torch.empty(B, len(self.full_heads), 0, Dv, dtype=dtype, device=device)
        self.stream_keys = torch.empty(B, len(self.stream_heads), 0, D, dtype=dtype, device=device)
        self.stream_values = torch.empty(B, len(self.stream_heads), 0, Dv, dtype=dtype, device=device)
        self.stream_pos = torch.empty(0, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Append the new states (B, Hkv, Q, D) to both sets; return the full heads' keys and values, the keys
        carrying the layer's `SplitKV` for the attention function; then evict the streaming set to its capacity."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        start = self.cumulative_length
        n = self.n_kv_heads
        full_k, full_v = self.keys, self.values
        sk, sv, pos = self.stream_keys, self.stream_values, self.stream_pos
        assert full_k is not None and full_v is not None  # all five set by lazy_initialization
        assert sk is not None and sv is not None and pos is not None
        if self.full_heads:
            full_k = self.keys = torch.cat([full_k, _select(key_states, self.full_heads, n)], dim=-2)
            full_v = self.values = torch.cat([full_v, _select(value_states, self.full_heads, n)], dim=-2)
        if self.stream_heads:
            sk = torch.cat([sk, _select(key_states, self.stream_heads, n)], dim=-2)
            sv = torch.cat([sv, _select(value_states, self.stream_heads, n)], dim=-2)
            pos = torch.cat([pos, torch.arange(start, start + q, device=pos.device)])
        self.cumulative_length = start + q
        split = SplitKV(self.full_heads, self.stream_heads, full_k, full_v, sk, sv, pos, start,
                        self.n_sink, self.window)
        self._evict(sk, sv, pos)
        keys = full_k.view(full_k.shape)  # a fresh view that carries the split (the stored tensor does not)
        keys._sinkscope_kv = split  # type: ignore[attr-defined]  # a Python attribute, read by headwise_attention
        return keys, full_v

    def _evict(self, sk: Tensor, sv: Tensor, pos: Tensor) -> None:
        """Keep the streaming keys a later query can see: positions ``< n_sink`` and the last ``window``."""
        seen, s, w = self.cumulative_length, self.n_sink, self.window
        if seen <= s + w or not self.stream_heads:
            self.stream_keys, self.stream_values, self.stream_pos = sk, sv, pos
            return
        n_s = min(s, int(pos.shape[0]))  # stored sinks come first (positions 0..s-1)
        self.stream_keys = torch.cat([sk[..., :n_s, :], sk[..., -w:, :]], dim=-2)
        self.stream_values = torch.cat([sv[..., :n_s, :], sv[..., -w:, :]], dim=-2)
        self.stream_pos = torch.cat([pos[:n_s], pos[-w:]])

    @property
    def evicted(self) -> int:
        """Tokens dropped from this layer's streaming heads."""
        return max(0, self.cumulative_length - self.n_sink - self.window) if self.stream_heads else 0

    def stored_bytes(self) -> int:
        """Bytes of the stored key/value tensors of both sets."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.stream_keys,
                                                            self.stream_values) if isinstance(t, Tensor))

    def get_mask_sizes(self, query_length: int | Tensor) -> tuple[int, int]:
        if isinstance(query_length, Tensor):
            query_length = int(query_length.shape[0])
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def crop(self, max_length: int) -> None:
        """Forget the last tokens (``crop(-n)``; ``crop(m)`` keeps the first ``m``); refused once a streaming head
        evicted a token that the shorter stream would hold again."""
        remove = -max_length if max_length < 0 else (self.cumulative_length - max_length if max_length else 0)
        if remove <= 0 or not self.is_initialized:
            return
        if self.evicted:
            raise InputError(f"cannot remove the last {remove} tokens from the head-wise cache: its streaming heads "
                             f"already evicted {self.evicted} tokens that the shorter stream needs back")
        assert self.keys is not None and self.values is not None  # initialised (checked above)
        assert self.stream_keys is not None and self.stream_values is not None and self.stream_pos is not None
        self.cumulative_length -= remove
        self.keys, self.values = self.keys[..., :-remove, :], self.values[..., :-remove, :]
        self.stream_keys = self.stream_keys[..., :-remove, :]
        self.stream_values = self.stream_values[..., :-remove, :]
        self.stream_pos = self.stream_pos[:-remove]

    def _rows(self, fn) -> None:
        if self.is_initialized:
            self.keys, self.values = fn(self.keys), fn(self.values)
            self.stream_keys, self.stream_values = fn(self.stream_keys), fn(self.stream_values)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._rows(lambda t: t[indices])

    def offload(self) -> None:
        super().offload()
        if self.is_initialized:
            assert self.stream_keys is not None and self.stream_values is not None  # set by lazy_initialization
            self.stream_keys, self.stream_values = self.stream_keys.to("cpu"), self.stream_values.to("cpu")

    def prefetch(self) -> None:
        super().prefetch()
        if not self.is_initialized:
            return
        assert self.stream_keys is not None and self.stream_values is not None  # set by lazy_initialization
        if self.stream_keys.device != self.device:
            self.stream_keys = self.stream_keys.to(self.device)
            self.stream_values = self.stream_values.to(self.device)

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0
        self.stream_keys = self.stream_values = self.stream_pos = None


class HeadwiseCache(Cache):
    """A :class:`transformers.Cache` of `HeadwiseLayer`, one per decoder layer, following a `KVPolicy`."""

    def __init__(self, policy: KVPolicy) -> None:
        self.policy = policy
        super().__init__(layers=[HeadwiseLayer(policy.full_heads[l], policy.n_kv_heads, policy.n_sink, policy.window)
                                 for l in range(policy.n_layers)])

    @property
    def _headwise_layers(self) -> list[HeadwiseLayer]:
        """``self.layers``, typed: `__init__` builds one `HeadwiseLayer` per decoder layer."""
        return cast(list[HeadwiseLayer], self.layers)  # cast: see above; Cache types them as any layer kind

    def stored_bytes(self) -> int:
        """Bytes of every stored key/value tensor (full and streaming sets, all layers)."""
        return sum(layer.stored_bytes() for layer in self._headwise_layers)

    def dense_bytes(self) -> int:
        """Bytes a dense cache of the same tokens, dtype and shapes would hold."""
        total = 0
        for layer in self._headwise_layers:
            if not layer.is_initialized:
                continue
            ref = layer.keys if layer.full_heads else layer.stream_keys
            assert ref is not None  # set by lazy_initialization
            B, _, _, D = ref.shape
            total += 2 * B * layer.n_kv_heads * layer.cumulative_length * D * ref.element_size()
        return total


def _refuse_padding_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Forward pre-hook: a `HeadwiseCache` call with padding in its 2D attention mask is refused (one line)."""
    if not isinstance(find_cache(kwargs, args), HeadwiseCache):
        return
    mask = kwargs.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 2 and not bool(mask.bool().all()):
        raise InputError("the head-wise KV cache does not take padded batches: run the rows one at a time "
                         "(or batch prompts of equal length)")


def headwise_cache(model: nn.Module, policy: KVPolicy) -> HeadwiseCache:
    """A head-wise cache for ``model`` following ``policy`` (pass it via `sinkscope.compat.cache_kwargs`).

    Switches ``model`` to the ``"sinkscope_kv"`` attention function (calls without a head-wise cache still run the
    previous implementation; `sinkscope.kv.attention.restore_attention` switches it back) and installs a pre-hook
    that refuses padded batches.

    Raises:
        InputError: the policy's shape does not match the model.
        UnsupportedArchitectureError: sliding-window / linear layers, learned sinks or soft-capping.

    >>> from sinkscope.models.random_hf import tiny_model
    >>> from sinkscope.compat import cache_kwargs
    >>> m = tiny_model("llama")
    >>> p = KVPolicy(((0,), ()), n_layers=2, n_kv_heads=2, n_sink=2, window=4, target_length=16)
    >>> cache = headwise_cache(m, p)
    >>> _ = m(torch.arange(3, 19)[None], **cache_kwargs(m, cache))
    >>> cache.stored_bytes() / cache.dense_bytes() == p.bytes_fraction(16)
    True
    """
    policy.check_model(model)
    use_headwise_attention(model)
    if not getattr(model, "_sinkscope_kv_padding_hook", False):
        model.register_forward_pre_hook(_refuse_padding_hook, with_kwargs=True)
        model._sinkscope_kv_padding_hook = True  # type: ignore[assignment]  # Module.__setattr__ is typed Tensor | Module
    return HeadwiseCache(policy)
