"""Attention operations for tinygpt: a registry (ATTENTION_FNS) of maps from queries and keys to attention weights.

Every entry turns ``q (B, H, Q, D)``, ``k (B, H, K, D)``, a boolean visibility ``mask (Q, K)`` and an optional
additive logit bias ``(H, Q, K)`` (ALiBi) into the weights the layer actually uses, ``(B, H, Q, K)``; the layer
then outputs ``weights @ v``. Masked entries are exactly 0. Kinds whose rows need not sum to one (sigmoid, relu,
elu1, softmax1) are measured both from these weights and from Gu et al.'s row-normalised proxy
(`sinkscope.metrics.sink.row_normalised`).

>>> import torch
>>> q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
>>> mask = torch.ones(4, 4).tril().bool()
>>> w = ATTENTION_FNS["softmax"](q, k, mask)
>>> torch.allclose(w.sum(-1), torch.ones(1, 2, 4))
True
>>> try:
...     ATTENTION_FNS["softmx"]
... except KeyError as e:
...     print(str(e).split("?")[0])
"Unknown attention kind 'softmx'. Did you mean: softmax, softmax1
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sinkscope.registry import Registry


@dataclass(frozen=True)
class AttentionFn:
    """One attention operation.

    Attributes:
        fn: ``(q, k, mask, logit_bias) -> weights``, shapes as in the module docstring.
        normalised: rows of the weights sum to one (softmax-like), so the proxy equals the weights.
        virtual_sink: the rows leave out mass that goes to a value-less virtual key (softmax + 1); it is
            reported as the sink slot.
    """

    fn: Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]
    normalised: bool
    virtual_sink: bool = False

    def __call__(self, q: Tensor, k: Tensor, mask: Tensor, logit_bias: Tensor | None = None) -> Tensor:
        return self.fn(q, k, mask, logit_bias)


ATTENTION_FNS: Registry[AttentionFn] = Registry("attention kind")


def register(name: str, *, normalised: bool, virtual_sink: bool = False):
    """Decorator: ``@register("sigmoid", normalised=False)`` adds an attention operation under ``name``."""

    def deco(fn: Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]):
        ATTENTION_FNS.add(name, AttentionFn(fn, normalised, virtual_sink))
        return fn

    return deco


def scaled_logits(q: Tensor, k: Tensor, logit_bias: Tensor | None) -> Tensor:
    """``q.k / sqrt(D)`` plus the optional bias: ``(B, H, Q, K)``."""
    z = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, Q, K)
    return z if logit_bias is None else z + logit_bias


@register("softmax", normalised=True)
def softmax_attention(q: Tensor, k: Tensor, mask: Tensor, logit_bias: Tensor | None = None) -> Tensor:
    """Standard causal softmax attention."""
    z = scaled_logits(q, k, logit_bias).masked_fill(~mask, float("-inf"))
    return torch.softmax(z, dim=-1)


@register("softmax1", normalised=False, virtual_sink=True)
def softmax1_attention(q: Tensor, k: Tensor, mask: Tensor, logit_bias: Tensor | None = None) -> Tensor:
    """Softmax with an extra zero logit (Miller's "softmax + 1"): ``exp(z) / (1 + sum exp(z))``.

    The missing row mass ``1 / (1 + sum exp(z))`` is the attention on a value-less virtual key.
    """
    z = scaled_logits(q, k, logit_bias).masked_fill(~mask, float("-inf"))
    zero = torch.zeros_like(z[..., :1])
    return torch.softmax(torch.cat([zero, z], dim=-1), dim=-1)[..., 1:]


@register("sigmoid", normalised=False)
def sigmoid_attention(q: Tensor, k: Tensor, mask: Tensor, logit_bias: Tensor | None = None) -> Tensor:
    """Gu et al.'s sigmoid attention: ``sigmoid(q.k / sqrt(D))`` times the 0/1 mask, no normaliser, no bias."""
    return torch.sigmoid(scaled_logits(q, k, logit_bias)) * mask


@register("sigmoid_norm", normalised=True)
def sigmoid_norm_attention(q: Tensor, k: Tensor, mask: Tensor, logit_bias: Tensor | None = None) -> Tensor:
    """Sigmoid scores normalised to sum to one per row (Gu et al.'s "sigmoid, normalised")."""
    w = sigmoid_attention(q, k, mask, logit_bias)
    return w / w.sum(-1, keepdim=True).clamp_min(1e-9)


@register("relu", normalised=False)
def relu_attention(q: Tensor, k: Tensor, mask: Tensor, logit_bias: Tensor | None = None) -> Tensor:
    """Guo et al.'s ReLU attention: ``relu(q.k / sqrt(D)) / n_visible(t)`` (no row normalisation)."""
    w = F.relu(scaled_logits(q, k, logit_bias)) * mask
    return w / mask.sum(-1, keepdim=True).clamp_min(1)


@register("relu_flat", normalised=False)
def relu_flat_attention(q: Tensor, k: Tensor, mask: Tensor, logit_bias: Tensor | None = None) -> Tensor:
    """ReLU attention with one divisor for every row, ``relu(q.k / sqrt(D)) / K`` (``K`` keys in the sequence):
    a control for ``relu``, whose ``1 / n_visible(t)`` leaves position 0's single term undivided."""
    w = F.relu(scaled_logits(q, k, logit_bias)) * mask
    return w / mask.shape[-1]


def _elu1_scores(q: Tensor, k: Tensor, mask: Tensor) -> Tensor:
    """Gu et al.'s ELU+1 kernel ``phi(q).phi(k) / sqrt(D)`` with ``phi = elu + 1``, times the 0/1 mask (the same
    ``1 / sqrt(D)`` scale as softmax logits; before issue 19 it was ``1 / D``, which only the unnormalised
    ``elu1`` felt: a normalised row does not see a common scale)."""
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1  # positive feature maps
    return (phi_q @ phi_k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) * mask  # (B, H, Q, K)


@register("elu1", normalised=False)
def elu1_attention(q: Tensor, k: Tensor, mask: Tensor, logit_bias: Tensor | None = None) -> Tensor:
    """ELU+1 kernel ``phi(q).phi(k) / sqrt(D)`` without normalisation (Gu et al.); position biases are ignored."""
    return _elu1_scores(q, k, mask)


@register("elu1_norm", normalised=True)
def elu1_norm_attention(q: Tensor, k: Tensor, mask: Tensor, logit_bias: Tensor | None = None) -> Tensor:
    """ELU+1 kernel normalised to rows summing to one (linear attention)."""
    w = _elu1_scores(q, k, mask)
    return w / w.sum(-1, keepdim=True).clamp_min(1e-9)


ATTENTION_FNS.freeze()
