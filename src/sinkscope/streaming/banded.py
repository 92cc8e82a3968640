"""Exact fast scoring of a long stream for policies whose attention pattern is a fixed mask.

Under ``dense``, ``window`` and ``sinks_plain`` (sinks + window with ABSOLUTE positions, ``reassign=False``) the
query at stream position ``t`` attends to a fixed set of keys, whatever came before:

* ``dense``: every ``k <= t``;
* ``window`` / ``sinks_plain``: ``k < n_sink`` (the sinks) or ``t - window <= k <= t`` (itself and the last
  ``window`` tokens), each key rotated at its absolute position.

So a block of ``C`` consecutive queries can go through the model in one forward with an additive "sinks + band"
attention mask, instead of ``C`` single-token forwards: each layer's keys/values of a token depend only on that
token's own (masked) context, which is the same in both computations. The keys a block ``[a, b)`` needs are the
sinks, the ``window`` tokens before ``a`` and the block itself -- exactly what a plain `SinkWindowCache` holds after
``a`` tokens plus the block's own. :func:`banded_stream_nll` feeds the stream in blocks through such a cache (a
``DynamicCache`` for ``dense``), passing the mask that hides, for each query, the keys outside its band. Memory is
bounded by ``n_sink + window + C`` tokens of K/V plus a ``C x (n_sink + window + C)`` score block per head; compute
is the same as a full forward of the stream, in ``T / C`` forwards instead of ``T``.

The re-assigned StreamingLLM variant (``sinks``) is not a fixed mask: its sinks move with every query (they sit
``n_sink + window - k`` positions before it), so it stays token by token here. An exact block scheme does exist --
RoPE scores depend only on the query-key offset, so the sink columns equal the query rotated to position
``n_sink + window`` (instead of ``t``) against the sinks at their own positions; an attention function that
computes the sink columns with that second query rotation and the band columns with the usual one would score
blocks exactly -- but it needs a custom attention kernel per architecture, which this module does not install.

Exactness holds for eager and SDPA attention (they honour a custom 4D mask) and RoPE whose frequencies do not depend
on the sequence length; :func:`fast_mode_obstacle` names what stands in the way otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import Cache

from sinkscope.compat import cache_kwargs

#: policies with a fixed attention mask: scored exactly in blocks
BANDED_POLICIES: tuple[str, ...] = ("dense", "window", "sinks_plain")

_MASKED_ATTENTION = ("eager", "sdpa")  # attention implementations that apply a custom 4D additive mask
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def fast_mode_obstacle(model: nn.Module) -> str | None:
    """Why block scoring would not be exact for ``model`` (``None``: it is exact)."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in _MASKED_ATTENTION:
        return f"attention implementation {impl!r} does not take a custom mask (eager and sdpa do)"
    for m in model.modules():
        rope_type = getattr(m, "rope_type", None)
        if isinstance(getattr(m, "inv_freq", None), torch.Tensor) and rope_type in _LENGTH_DEPENDENT_ROPE:
            return f"RoPE type {rope_type!r} changes its frequencies with the length of the forward"
    return None


def sink_window_visible(q_pos: torch.Tensor, k_pos: torch.Tensor, n_sink: int, window: int | None) -> torch.Tensor:
    """(Q, K) bool, the one home of the sinks + window rule: query ``q_pos[i]`` sees key ``k_pos[j]`` when
    ``k <= q`` and (``k < n_sink`` or ``k >= q - window``); ``window=None``: causal only. Absolute positions.

    >>> sink_window_visible(torch.arange(4), torch.arange(4), 1, 1).int().tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 1, 1]]
    """
    q, k = q_pos[:, None], k_pos[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= (k < n_sink) | (k >= q - window)
    return allowed


def band_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, n_sink: int, window: int | None,
              dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask (1, 1, Q, K): 0 where query ``q_pos[i]`` may see key ``k_pos[j]``
    (`sink_window_visible`), the dtype's minimum elsewhere.

    Shapes: ``q_pos`` (Q,), ``k_pos`` (K,), absolute stream positions."""
    allowed = sink_window_visible(q_pos, k_pos, n_sink, window)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=q_pos.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def cached_positions(seen: int, n_sink: int, window: int) -> torch.Tensor:
    """Stream positions of the keys a plain sink cache holds after ``seen`` tokens, in its stored order (T,)."""
    if seen <= n_sink + window:
        return torch.arange(seen)
    return torch.cat([torch.arange(n_sink), torch.arange(seen - window, seen)])


@torch.no_grad()
def banded_stream_nll(model: nn.Module, ids: torch.Tensor, cache: Cache, *, n_sink: int, window: int | None,
                      chunk: int = 512, on_chunk: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Score every next token of ``ids`` in blocks of ``chunk`` queries, exactly as token by token.

    Args:
        model: a causal LM (see :func:`fast_mode_obstacle`).
        ids: (T,) token ids on the model's device; positions ``0..T-2`` are fed, ``1..T-1`` predicted.
        cache: a fresh ``DynamicCache`` (``window=None``, dense) or a plain ``SinkWindowCache`` with the same
            ``n_sink`` and ``window``.
        n_sink: sinks every query sees (0 for window-only).
        window: earlier tokens each query sees besides the sinks; ``None``: all (dense).
        chunk: queries per forward.
        on_chunk: called after each block with (tokens scored so far, K/V tokens the block attended over).

    Returns:
        (T - 1,) NLL in nats (fp32, on the CPU) of positions ``1..T-1``.
    """
    device = ids.device
    n = len(ids) - 1  # tokens fed
    nll = torch.empty(max(n, 0))
    dtype = next(model.parameters()).dtype
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        seen = cache.get_seq_length()
        kwargs = {}
        if window is not None:
            k_pos = torch.cat([cached_positions(seen, n_sink, window), torch.arange(start, end)]).to(device)
            kwargs["attention_mask"] = band_mask(torch.arange(start, end, device=device), k_pos, n_sink, window, dtype)
        logits = model(input_ids=ids[None, start:end], use_cache=True, **cache_kwargs(model, cache), **kwargs).logits[0]
        nll[start:end] = torch.nn.functional.cross_entropy(logits.float(), ids[start + 1:end + 1],
                                                           reduction="none").cpu()
        if on_chunk is not None:
            held = seen if window is None else min(seen, n_sink + window)
            on_chunk(end, held + end - start)
    return nll
