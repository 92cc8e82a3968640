"""Attention under a per-head KV policy: the dense reference (one forward, per-head masks) and the split kernel.

Visibility (`sinkscope.kv.policy`): a full-cache kv head's queries see every earlier key; a streaming head's query
at position ``t`` sees key ``k`` iff ``k <= t`` and (``k < n_sink`` or ``k >= t - window``). GQA: query head ``h``
uses kv head ``h // G`` (``G = H / H_kv``), so a kv head's query heads follow it.

Two registered attention functions (transformers' ``AttentionInterface``; masks built by ``sdpa_mask``):

* ``"sinkscope_kv_reference"`` (`policy_masked`): the policy's exact effect on a dense forward -- every head
  attends over the whole sequence through its own boolean mask (`policy_mask`). Quadratic in ``T`` like any dense
  forward; used to measure the policy's KL (`sinkscope.kv.calibrate`) and by the tests as the reference.
* ``"sinkscope_kv"`` (`headwise_attention`): what the head-wise cache (`sinkscope.kv.cache`) runs. The cache hands
  it two key/value sets per layer, the full heads' (every token) and the streaming heads' (sinks + window + the new
  tokens), each in its own smaller tensor (`SplitKV`); it runs one SDPA call per set on that set's query heads and
  writes both outputs back in head order. No dense per-layer copy is ever built. Calls without a split (any other
  cache, or none) go to the implementation the model had before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from sinkscope.errors import UnsupportedArchitectureError
from sinkscope.kv.policy import KVPolicy
from sinkscope.models.adapters import get_adapter
from sinkscope.streaming.banded import sink_window_visible

HEADWISE = "sinkscope_kv"
REFERENCE = "sinkscope_kv_reference"

#: id(attention module) -> (layer index, policy) while `policy_masked` is active
_REFERENCE_POLICY: dict[int, tuple[int, KVPolicy]] = {}
#: id(model config) -> the attention implementation the model had before `use_headwise_attention`
_PREVIOUS: dict[int, str] = {}


def causal_visible(q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """(Q, K) bool: a full head's query at ``q_pos[i]`` sees the key at ``k_pos[j]``."""
    return k_pos[None, :] <= q_pos[:, None]


def policy_mask(policy: KVPolicy, layer: int, q_len: int, k_len: int, device: torch.device | str = "cpu") -> Tensor:
    """The policy's dense per-kv-head mask of one layer: (Hkv, q_len, k_len) bool, True where the query sees the key.

    Queries are the last ``q_len`` of ``k_len`` positions (``0..k_len-1``), as in a forward that continues a
    cache of ``k_len - q_len`` tokens.

    >>> p = KVPolicy(((1,),), n_layers=1, n_kv_heads=2, n_sink=1, window=1, target_length=4)
    >>> policy_mask(p, 0, 4, 4).int()[0].tolist()  # streaming head: sink + itself + one before
    [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 1, 1]]
    >>> policy_mask(p, 0, 4, 4).int()[1].tolist()  # full head: causal
    [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    """
    k_pos = torch.arange(k_len, device=device)
    q_pos = k_pos[k_len - q_len:]
    full = causal_visible(q_pos, k_pos)
    stream = sink_window_visible(q_pos, k_pos, policy.n_sink, policy.window)
    is_full = torch.zeros(policy.n_kv_heads, dtype=torch.bool, device=device)
    is_full[list(policy.full_heads[layer])] = True
    return torch.where(is_full[:, None, None], full, stream)


def check_supported(model: nn.Module) -> None:
    """`UnsupportedArchitectureError` (one line) for models whose attention the policy functions do not compute:
    learned sink logits, logit soft-capping, sliding-window or linear-attention layers."""
    from sinkscope.compat import attention_layer_types

    a = get_adapter(model)
    types = attention_layer_types(model.config.get_text_config(decoder=True))
    if any(t != "full_attention" for t in types):
        raise UnsupportedArchitectureError(
            f"{a.model_type} has non-full-attention layers ({sorted(set(types))}); per-head KV policies support "
            "models whose every layer is full causal attention")
    if a.spec.sink_param or a.softcap:
        raise UnsupportedArchitectureError(
            f"{a.model_type} uses learned sink logits or logit soft-capping, which the per-head KV attention does "
            "not compute")


# ---- the dense reference -------------------------------------------------------------------------------------
def reference_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                        scaling: float | None = None, dropout: float = 0.0, **kwargs: Any
                        ) -> tuple[Tensor, None]:
    """Registered as ``"sinkscope_kv_reference"``: dense attention with the policy's per-head mask.

    Shapes: query (B, H, Q, D), key/value (B, Hkv, K, D) (the queries are the last Q of K positions); returns the
    output (B, Q, H, D)."""
    entry = _REFERENCE_POLICY.get(id(module))
    if entry is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    layer, policy = entry
    B, H, Q, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    mask = policy_mask(policy, layer, Q, K, query.device).repeat_interleave(H // Hkv, dim=0)[None]  # (1, H, Q, K)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        mask = mask & attention_mask[..., -K:]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=H != Hkv)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def policy_masked(model: nn.Module, policy: KVPolicy) -> Iterator[None]:
    """Within the block, ``model``'s forwards attend exactly as ``policy`` allows, through dense per-head masks
    (no cache needed: run whole sequences with ``use_cache=False``)."""
    check_supported(model)
    policy.check_model(model)
    a = get_adapter(model)
    ids = {id(a.attention_module(l)): (l, policy) for l in a.attention_layers}
    if any(i in _REFERENCE_POLICY for i in ids):
        raise RuntimeError("this model is already under a policy mask")
    previous = model.config._attn_implementation
    model.set_attn_implementation(REFERENCE)
    _REFERENCE_POLICY.update(ids)
    try:
        yield
    finally:
        for i in ids:
            _REFERENCE_POLICY.pop(i, None)
        model.set_attn_implementation(previous)


# ---- the split kernel ------------------------------------------------------------------------------------------
@dataclass
class SplitKV:
    """What the head-wise cache hands the attention function for one layer and one forward.

    Attributes:
        full_heads, stream_heads: kv head indices of each set (ascending; together ``0..Hkv-1``).
        full_keys, full_values: (B, n_full, K_full, D), every token so far, at positions ``0..K_full-1``.
        stream_keys, stream_values: (B, n_stream, K_s, D), sinks + window + this forward's tokens.
        stream_pos: (K_s,) absolute positions of the streaming keys.
        q_start: absolute position of this forward's first query.
        n_sink, window: the streaming rule.
    """

    full_heads: tuple[int, ...]
    stream_heads: tuple[int, ...]
    full_keys: Tensor
    full_values: Tensor
    stream_keys: Tensor
    stream_values: Tensor
    stream_pos: Tensor
    q_start: int
    n_sink: int
    window: int


def _heads(x: Tensor, heads: tuple[int, ...], n: int) -> Tensor:
    """``x[:, heads]`` for x (B, n, ...): a view when ``heads`` is a contiguous run, else a gathered copy."""
    if len(heads) == n:
        return x
    if heads == tuple(range(heads[0], heads[0] + len(heads))):
        return x[:, heads[0]:heads[0] + len(heads)]
    return x[:, list(heads)]


def headwise_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                       scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, None]:
    """Registered as ``"sinkscope_kv"``: full heads and streaming heads attend over their own key sets.

    ``key`` carries the layer's `SplitKV` (attribute ``_sinkscope_kv``) when a head-wise cache produced it; any
    other call runs the model's previous implementation. Shapes: query (B, H, Q, D); returns (B, Q, H, D)."""
    split: SplitKV | None = getattr(key, "_sinkscope_kv", None)
    if split is None:
        previous = _PREVIOUS.get(id(module.config))
        fn = ALL_ATTENTION_FUNCTIONS[previous] if previous not in (None, "eager", "sdpa", HEADWISE) \
            and previous in ALL_ATTENTION_FUNCTIONS else sdpa_attention_forward
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    B, H, Q, D = query.shape
    Hkv = len(split.full_heads) + len(split.stream_heads)
    G = H // Hkv
    q_pos = torch.arange(split.q_start, split.q_start + Q, device=query.device)
    out = query.new_empty(B, Q, Hkv, G, D)
    qg = query.view(B, Hkv, G, Q, D)
    for heads, k, v, mask in (
            (split.full_heads, split.full_keys, split.full_values,
             None if Q == 1 else causal_visible(q_pos, torch.arange(split.full_keys.shape[2], device=query.device))),
            (split.stream_heads, split.stream_keys, split.stream_values,
             None if Q == 1 else sink_window_visible(q_pos, split.stream_pos, split.n_sink, split.window))):
        if not heads:
            continue
        n = len(heads)
        qh = _heads(qg, heads, Hkv).reshape(B, n * G, Q, D)
        o = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scaling, enable_gqa=G > 1)
        o = o.view(B, n, G, Q, D).permute(0, 3, 1, 2, 4)  # (B, Q, n, G, D)
        if n == Hkv:
            out.copy_(o)
        elif heads == tuple(range(heads[0], heads[0] + n)):
            out[:, :, heads[0]:heads[0] + n] = o
        else:
            out[:, :, list(heads)] = o
    return out.view(B, Q, H, D), None


def use_headwise_attention(model: nn.Module) -> None:
    """Switch ``model`` to ``"sinkscope_kv"`` (once); it computes what the previous implementation did for every
    call that does not come from a head-wise cache."""
    check_supported(model)
    current = model.config._attn_implementation
    if current == HEADWISE:
        return
    a = get_adapter(model)
    for l in a.attention_layers:
        _PREVIOUS[id(a.attention_module(l).config)] = current
    _PREVIOUS[id(model.config)] = current
    model.set_attn_implementation(HEADWISE)


def restore_attention(model: nn.Module) -> None:
    """Undo `use_headwise_attention`: ``model`` gets back the attention implementation it had before (a no-op for
    a model that was never switched). Call it when done with head-wise caches, before handing the model to code
    that reads its implementation (e.g. the streaming evaluation's block mode)."""
    if model.config._attn_implementation != HEADWISE:
        return
    previous = _PREVIOUS.get(id(model.config), "sdpa")
    model.set_attn_implementation(previous)


AttentionInterface.register(HEADWISE, headwise_attention)
AttentionInterface.register(REFERENCE, reference_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(HEADWISE, sdpa_mask)
ALL_MASK_ATTENTION_FUNCTIONS.register(REFERENCE, sdpa_mask)
