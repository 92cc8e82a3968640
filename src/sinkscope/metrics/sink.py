"""What a sink is: alpha (Gu et al.'s per-head sink score), ``Sink_k^eps`` and the row-normalised proxy, defined once.

Every sink number in sinkscope comes from these functions: the profiler's collectors (`sinkscope.collectors`),
`SinkProfile`, the training metrics, run sinkness and dormancy (RESEARCH.md §1, Gu et al. 2410.10781 §3):

- ``alpha[h, k]``: the mean attention key ``k`` receives from the queries ``t`` that can see it,
  ``sum_t A[h, t, k] / #{t : t sees k}`` (`alpha_sums`, `alpha_from_sums`, `column_alpha`);
- ``Sink_k^eps``: the share of heads (and samples) whose ``alpha_k`` exceeds ``eps`` (`is_sink`, `sink_ratio`);
- the row-normalised proxy, for attention whose rows need not sum to one: ``|w| / sum |w|`` per row, the sum
  over real keys plus the sink slot (`row_normalised`);
- the first token's norm relative to the other tokens' (value drain, residual peak: `first_norm_ratio`).

Shapes: B batch rows, H heads, Q queries, K keys, D features.

>>> import torch
>>> w = torch.tensor([[[[1.0, 0.0], [0.6, 0.4]]]])  # (B=1, H=1, Q=2, K=2): causal softmax rows
>>> column_alpha(w, torch.ones(2, 2).tril().bool())  # key 0 seen by both queries, key 1 by the second
tensor([[0.8000, 0.4000]])
>>> sink_ratio(torch.tensor([0.8, 0.2]), eps=0.3)
0.5
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from sinkscope.errors import InputError

ArrayT = TypeVar("ArrayT", np.ndarray, Tensor)

#: Gu et al.'s default sink threshold.
DEFAULT_EPS = 0.3


def check_eps(eps: float, *, param: str = "eps") -> float:
    """The one check of a sink threshold: a number strictly between 0 and 1 (NaN is refused).

    >>> check_eps(0.3)
    0.3
    >>> check_eps(2)
    Traceback (most recent call last):
    ...
    sinkscope.errors.InputError: eps must be in (0, 1), got 2

    Raises:
        InputError: anything else, naming ``param``.
    """
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or not 0 < eps < 1:
        raise InputError(f"{param} must be in (0, 1), got {eps!r}", param=param)
    return float(eps)


def check_count(n: int, *, param: str, minimum: int = 0) -> int:
    """The one check of a position or count argument: an integer (not a bool, not a float) ``>= minimum``.

    >>> check_count(3, param="k")
    3
    >>> check_count(0.5, param="k")
    Traceback (most recent call last):
    ...
    sinkscope.errors.InputError: k must be an integer >= 0, got 0.5

    Raises:
        InputError: anything else, naming ``param``.
    """
    if isinstance(n, bool) or not hasattr(n, "__index__") or int(n) < minimum:
        raise InputError(f"{param} must be an integer >= {minimum}, got {n!r}", param=param)
    return int(n)


def alpha_sums(weights: Tensor, visible: Tensor, queries: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The two sums alpha is made of: attention each key receives, and how many queries see it.

    Args:
        weights: attention weights ``(B, H, Q, K)`` as the model used them.
        visible: bool ``(Q, K)`` or ``(B, Q, K)``: query t may attend key k (causal / window / prefix mask).
        queries: optional bool ``(B, Q)``: the queries to count (real tokens, or one input class).
    Returns:
        ``colsum (B, H, K)``: sum over the selected queries that see ``k`` of ``A[b, h, t, k]``;
        ``count (B, K)``: the number of those queries (same dtype as ``weights``).
    """
    B, H, Q, K = weights.shape
    sel = visible.expand(B, Q, K) if visible.dim() == 3 else visible[None].expand(B, Q, K)
    if queries is not None:
        sel = sel & queries[:, :, None]
    selw = sel.to(weights.dtype)  # (B, Q, K)
    return torch.einsum("bhqk,bqk->bhk", weights, selw), selw.sum(dim=1)


def alpha_from_sums(colsum: ArrayT, count: ArrayT) -> ArrayT:
    """``alpha (B, H, K) = colsum / count`` (NaN where no query sees the key): Gu et al.'s per-head sink score."""
    return colsum / count[:, None, :]


def column_alpha(weights: Tensor, visible: Tensor, queries: Tensor | None = None, *,
                 per_sample: bool = False) -> Tensor:
    """alpha of every key from full attention weights, pooled over the batch (or ``per_sample``).

    Args:
        weights: ``(B, H, Q, K)``; visible: ``(Q, K)`` bool; queries: optional ``(B, Q)`` bool (see `alpha_sums`).
        per_sample: keep the batch dimension.
    Returns:
        ``(H, K)`` (sums over rows, then divided), or ``(B, H, K)`` with ``per_sample``; 0 where no selected
        query sees the key.
    """
    colsum, count = alpha_sums(weights, visible, queries)
    if per_sample:
        return colsum / count.clamp_min(1)[:, None, :]
    return colsum.sum(0) / count.sum(0).clamp_min(1)[None, :]


def row_normalised(weights: Tensor, slot: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Gu et al.'s proxy for non-softmax kinds: ``|w| / sum |w|`` per row, over real keys plus the sink slot.

    Args:
        weights: ``(B, H, Q, K)`` attention weights as used.
        slot: ``(B, H, Q)`` weight on a bias key / virtual key, or None.
    Returns:
        The normalised weights ``(B, H, Q, K)`` and slot ``(B, H, Q)`` (None when ``slot`` is None).
    """
    w = weights.abs()
    total = w.sum(-1)
    if slot is not None:
        total = total + slot.abs()
    total = total.clamp_min(1e-12)
    return w / total[..., None], (None if slot is None else slot.abs() / total)


def is_sink(alpha: ArrayT, eps: float = DEFAULT_EPS) -> ArrayT:
    """``alpha > eps`` elementwise (bool, same shape and library as ``alpha``); NaN (no measurement) is not a sink."""
    if isinstance(alpha, Tensor):
        return torch.nan_to_num(alpha, nan=-1.0) > eps
    return np.nan_to_num(np.asarray(alpha, dtype=np.float64), nan=-1.0) > eps


def sink_ratio(alpha: np.ndarray | Tensor, eps: float = DEFAULT_EPS) -> float:
    """``Sink^eps``: the share of entries of ``alpha`` (one key's scores, any of layers x samples x heads) that
    exceed ``eps``; Gu et al. threshold each sample's alpha and average the indicator over samples, layers and
    heads."""
    s = is_sink(alpha, eps)
    return float(s.float().mean()) if isinstance(s, Tensor) else float(s.mean())


def first_and_median_norm(norms: Tensor) -> tuple[float, float]:
    """The first position's norm and the other positions' median, pooled over rows: ``norms (B, T)`` ->
    ``(mean over rows of norms[b, 0], the (lower) median over rows and positions t >= 1)``."""
    return float(norms[:, 0].mean()), float(norms[:, 1:].median())


def first_norm_ratio(norms: Tensor) -> float:
    """First position's norm over the other positions' median (`first_and_median_norm`), pooled over rows:
    ``norms (B, T)`` -> scalar."""
    first, median = first_and_median_norm(norms)
    return first / max(median, 1e-12)


def norm_ratio(x: Tensor) -> float:
    """`first_norm_ratio` of the vectors ``x (B, T, D)`` (their Euclidean norms)."""
    return first_norm_ratio(x.norm(dim=-1))


def first_vs_median(x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per sample ``x[..., 0] / median(x[..., 1:len])``, averaged over samples: ``x (N, ..., T)`` -> ``(...)``
    (NaN when no sample has a second token)."""
    out = []
    for i, n in enumerate(lengths):
        if n < 2:
            continue
        med = np.median(x[i, ..., 1:n], axis=-1)
        out.append(x[i, ..., 0] / np.maximum(med, 1e-30))
    if not out:
        return np.full(x.shape[1:-1], np.nan)
    return np.mean(out, axis=0)
