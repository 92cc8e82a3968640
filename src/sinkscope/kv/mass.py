"""Where each kv head's attention goes, split the way a sinks + window cache splits it: sinks, window, the rest.

For query ``t`` and key ``k <= t`` of one head, with softmax weights ``p[t, k]``:

* sink mass ``= sum_{k < n_sink} p[t, k]``;
* window mass ``= sum_{t - window <= k <= t} p[t, k]`` (the query itself and the ``window`` keys before it, the
  keys a streaming head keeps besides its sinks; `sinkscope.kv.policy`);
* distant mass ``= 1 - sink - window``: what a streaming head drops.

Only queries with ``t > n_sink + window`` count (earlier ones lose nothing), so the three regions never overlap.
Per kv head the masses of its ``G`` query heads (GQA) are **summed** (they add up to ``G``), then averaged over the
counted queries of every text. Memory: queries go in blocks of ``block`` rows against all keys, so a layer needs
``block x T`` scores per head, linear in ``T``; never the (T, T) matrix.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sinkscope.errors import InputError, UnsupportedArchitectureError
from sinkscope.models.adapters import get_adapter
from sinkscope.progress import ProgressCallback

#: rows of queries per block of the mass computation
BLOCK = 64


def first_counted_query(n_sink: int, window: int) -> int:
    """The first query position that can drop anything under sinks + window (earlier ones see every key)."""
    return n_sink + window + 1


@torch.no_grad()
def layer_masses(query: Tensor, key: Tensor, scaling: float, n_sink: int, window: int, *, block: int = BLOCK,
                 softcap: float | None = None, value: Tensor | None = None, w_o: Tensor | None = None
                 ) -> tuple[Tensor, int]:
    """Summed (sink, window, distant[, drop error]) of one causal attention layer, per kv head.

    Args:
        query: (B, H, T, D) queries after RoPE (no padding: every position is real).
        key: (B, Hkv, T, D) keys after RoPE.
        scaling: multiplier of q.k.
        n_sink, window: the streaming rule (see the module docstring).
        block: query rows per block.
        softcap: logit soft-capping (``softcap * tanh(s / softcap)``), if the model uses it.
        value: (B, Hkv, T, Dv) values; with ``w_o`` adds the drop error (see `head_masses`).
        w_o: the output projection's weight (d_model, H * Dv), input = heads concatenated.

    Returns:
        ``(sums (Hkv, 3 or 4) float64 on the CPU, n_queries)``: per kv head the masses summed over its query heads,
        the counted queries and the batch rows; columns (sink, window, distant[, drop error]). Divide by
        ``n_queries``.
    """
    B, H, T, D = query.shape
    Hkv = key.shape[1]
    G = H // Hkv
    t0 = first_counted_query(n_sink, window)
    with_error = value is not None and w_o is not None
    sums = torch.zeros(Hkv, 4 if with_error else 3, dtype=torch.float64)
    if T <= t0:
        return sums, 0
    q = query.float().reshape(B, Hkv, G, T, D)
    k = key.float()
    if with_error:
        v = value.float()[:, :, None]  # (B, Hkv, 1, T, Dv)
        wo = w_o.float().reshape(w_o.shape[0], Hkv, G, -1)  # (d_model, Hkv, G, Dv)
    for q0 in range(t0, T, block):
        q1 = min(T, q0 + block)
        n = q1 - q0
        s = torch.einsum("bhgqd,bhkd->bhgqk", q[:, :, :, q0:q1], k[:, :, :q1]) * scaling  # (B, Hkv, G, n, q1)
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        rows = torch.arange(q0, q1)[:, None]
        cols = torch.arange(q1)[None, :]
        s.masked_fill_(cols > rows, float("-inf"))
        p = torch.softmax(s, dim=-1).double()
        c = p.cumsum(-1)  # c[..., j] = mass on keys 0..j
        total = c[..., -1]
        sink = c[..., n_sink - 1] if n_sink > 0 else torch.zeros_like(total)
        before_window = c.gather(-1, (rows - window - 1).expand(B, Hkv, G, n, 1)).squeeze(-1)  # keys < t - window
        window_mass = total - before_window
        distant = before_window - sink
        parts = [sink, window_mass, distant]
        if with_error:
            err = _drop_error(p.float(), v[..., :q1, :], wo, rows, n_sink, window, distant.float())  # (B, Hkv, n)
            parts.append(err[:, :, None, :].expand_as(sink).double() / G)  # summed over g below: once per kv head
        sums += torch.stack(parts, -1).sum(dim=(0, 2, 3)).cpu()
    return sums, B * (T - t0)


def _drop_error(p: Tensor, v: Tensor, wo: Tensor, rows: Tensor, n_sink: int, window: int, distant: Tensor
                ) -> Tensor:
    """Per query, the norm of the change of the attention layer's output (after W_O) if this kv head alone kept
    only sinks + window: ``|| sum_g W_O[h_g] (o_full - o_kept / (1 - m)) ||``.

    Shapes: p (B, Hkv, G, n, K) softmax weights, v (B, Hkv, 1, K, Dv), wo (d_model, Hkv, G, Dv), rows (n, 1) query
    positions, distant (B, Hkv, G, n) dropped mass. Returns (B, Hkv, n)."""
    cols = torch.arange(p.shape[-1])[None, :]
    kept = (cols < n_sink) | (cols >= rows - window)  # (n, K), within the causal part
    o_full = p @ v  # (B, Hkv, G, n, Dv)
    o_kept = (p * kept) @ v / (1 - distant).clamp_min(1e-12)[..., None]
    e = o_full - o_kept
    return torch.einsum("bhgnd,mhgd->bhnm", e, wo).norm(dim=-1)


class _MassObserver:
    """Receives every attention call (`sinkscope.capture.observe_attention`) and adds up its layer's masses."""

    def __init__(self, model: nn.Module, n_sink: int, window: int, block: int) -> None:
        a = get_adapter(model)
        self.adapter = a
        self.layer_of = {id(a.attention_module(l)): l for l in a.attention_layers}
        self.n_sink, self.window, self.block = n_sink, window, block
        self.sums = torch.zeros(a.n_layers, a.n_kv_heads, 4, dtype=torch.float64)
        self.counts = torch.zeros(a.n_layers, dtype=torch.float64)

    def observe(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                scaling: float, **kwargs: Any) -> Tensor | None:
        layer = self.layer_of.get(id(module))
        if layer is None:
            return None
        if kwargs.get("sliding_window") or kwargs.get("s_aux") is not None:
            raise UnsupportedArchitectureError("head masses need plain full causal attention (no sliding window, "
                                               "no learned sink logits)")
        sums, n = layer_masses(query, key, scaling, self.n_sink, self.window, block=self.block,
                               softcap=kwargs.get("softcap"), value=value,
                               w_o=self.adapter.output_projection(layer).weight)
        self.sums[layer] += sums
        self.counts[layer] += n
        return None  # the model's own attention computes the output


@torch.no_grad()
def head_masses(model: nn.Module, texts: Iterable[Tensor], *, n_sink: int, window: int, block: int = BLOCK,
                progress: ProgressCallback | None = None, total: int | None = None) -> np.ndarray:
    """Mean (distant, sink, window) attention mass of every (layer, kv head) over token sequences.

    Args:
        model: a Hugging Face causal LM with an adapter and full causal attention in every layer.
        texts: 1D token-id tensors, each run as one unpadded row (``len > n_sink + window + 1`` to count).
        n_sink, window: the streaming rule.
        block: query rows per block (memory ``block x T`` scores per head).
        progress: called after each text with (texts done, ``total``, "texts").

    Returns:
        (L, Hkv, 4) float64: columns distant, sink, window, drop error (`sinkscope.kv.policy.SCORE_COLUMNS`): the
        masses summed over the kv head's query heads, and the norm of the change of the layer's attention output
        (after W_O, summed over the kv head's query heads) if that kv head alone kept only sinks + window; all
        averaged over the counted queries.

    Raises:
        InputError: no text was long enough to count a query.
    """
    from sinkscope.capture import observe_attention
    from sinkscope.devices import model_device

    device = model_device(model)
    obs = _MassObserver(model, n_sink, window, block)
    with observe_attention(model, obs):
        for i, ids in enumerate(texts):
            model(input_ids=ids.reshape(1, -1).to(device), use_cache=False)
            if progress is not None:
                progress(i + 1, total, "texts")
    if float(obs.counts.max()) == 0:
        raise InputError(f"no calibration text is longer than n_sink + window + 1 = "
                         f"{first_counted_query(n_sink, window)} tokens: nothing to measure")
    means = obs.sums / obs.counts.clamp_min(1)[:, None, None]
    return means[..., [2, 0, 1, 3]].numpy()  # distant, sink, window, drop error
