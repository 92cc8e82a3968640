"""Capture points on HF models: a registered attention function and forward hooks, reduced on the fly.

`observe_attention(model, observer)` switches the model to the ``"sinkscope"`` attention implementation
(registered with transformers' ``AttentionInterface``), which hands every attention call to the observer and
restores the previous implementation on exit. Forward hooks (`forward_hooks`, from `sinkscope.hooks`) observe
decoder layers, MLP down projections and q projections. No module's ``forward`` is ever replaced.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from sinkscope.hooks import forward_hooks as forward_hooks

ATTENTION_NAME = "sinkscope"


class AttentionObserver(Protocol):
    """Receives every attention call of an observed model.

    ``observe`` gets the tensors exactly as the model passes them to its attention function and returns the
    attention output ``(B, Q, H, D)``, or None to let the base implementation compute it.
    """

    def observe(
        self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
        scaling: float, **kwargs: Any,
    ) -> Tensor | None: ...


#: id(module) -> (observer, the attention implementation the model had before), for every submodule.
_OBSERVERS: dict[int, tuple[AttentionObserver, str]] = {}


def _base_attention(module: nn.Module, previous: str | None, kwargs: dict[str, Any]) -> Callable[..., Any]:
    """The attention function the model would have used: its previous implementation, else its own eager
    function when the call needs features SDPA lacks (learned sinks, soft-capping), else SDPA."""
    if previous and previous not in ("eager", ATTENTION_NAME) and previous in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[previous]
    modeling = sys.modules.get(type(module).__module__)
    eager = getattr(modeling, "eager_attention_forward", None)
    needs_eager = previous == "eager" or getattr(module, "sinks", None) is not None or kwargs.get("softcap")
    if needs_eager and eager is not None:
        return eager
    return sdpa_attention_forward


def sinkscope_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
    scaling: float | None = None, dropout: float = 0.0, **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """Attention function registered as ``"sinkscope"``: observers first, then the base implementation."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    observer, previous = _OBSERVERS.get(id(module), (None, None))
    if observer is not None:
        out = observer.observe(module, query, key, value, attention_mask, scaling, **kwargs)
        if out is not None:
            return out, None
    base = _base_attention(module, previous, kwargs)
    if base is not sdpa_attention_forward and (attention_mask is None or attention_mask.dtype == torch.bool):
        # eager functions add the mask to the scores: our masks are SDPA-style (boolean, or None for causal)
        if attention_mask is None:
            Q, K = query.shape[2], key.shape[2]
            q_pos = torch.arange(K - Q, K, device=query.device)[:, None]
            k_pos = torch.arange(K, device=query.device)[None, :]
            attention_mask = k_pos <= q_pos
            if kwargs.get("sliding_window"):
                attention_mask = attention_mask & (q_pos - k_pos < kwargs["sliding_window"])
            attention_mask = attention_mask[None, None]
        attention_mask = torch.zeros_like(attention_mask, dtype=query.dtype).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min)
    return base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


AttentionInterface.register(ATTENTION_NAME, sinkscope_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


@contextlib.contextmanager
def observe_attention(model: nn.Module, observer: AttentionObserver) -> Iterator[None]:
    """Route ``model``'s attention through ``observer`` for the duration of the block."""
    previous = model.config._attn_implementation
    ids = [id(m) for m in model.modules()]
    if any(i in _OBSERVERS for i in ids):
        raise RuntimeError("this model is already being observed")
    model.set_attn_implementation(ATTENTION_NAME)
    _OBSERVERS.update(dict.fromkeys(ids, (observer, previous)))
    try:
        yield
    finally:
        for i in ids:
            _OBSERVERS.pop(i, None)
        model.set_attn_implementation(previous)


@torch.no_grad()
def attention_probs_eager(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None) -> list[Tensor]:
    """Reference: every layer's (B, H, T, T) attention from ``output_attentions=True`` with eager attention.

    Quadratic memory: only for checking the streaming metrics on short inputs.
    """
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    return [a for a in out.attentions if a is not None]
