"""MLP-neuron and attention-head activation statistics: token 0 versus every other position.

The MLP "neuron" activation of layer ``l`` is the input of its down projection (``act(gate) * up``, shape
(B, T, F)); a head's output is its slice of the attention output projection's input (shape (B, T, H, D)).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sinkscope.capture import forward_hooks
from sinkscope.models.adapters import ModelAdapter, get_adapter
from sinkscope.repetition.generate import left_pad


def output_projection(adapter: ModelAdapter, layer: int) -> nn.Module:
    """The attention output projection of ``layer`` (its input is the concatenated head outputs (B, T, H*D))."""
    attn = adapter.attention_module(layer)
    for name in ("o_proj", "dense", "c_proj", "out_proj"):
        m = getattr(attn, name, None)
        if isinstance(m, nn.Module):
            return m
    raise AttributeError(f"no output projection found in {type(attn).__name__}")


@dataclass
class NeuronStats:
    """Per layer, per neuron statistics over a set of sequences (lists indexed by layer; tensors (F,)).

    Attributes:
        first: mean |a| at each sequence's first token.
        other_max: max |a| over all other positions (the neuron's ordinary range).
        other_q: the ``q`` quantile of |a| over other positions.
        other_median: median signed activation over other positions (the value a clamped neuron is set to).
        n_positions: how many non-first positions were seen.
    """

    first: list[Tensor]
    other_max: list[Tensor]
    other_q: list[Tensor]
    other_median: list[Tensor]
    n_positions: int


def few_logits(model: nn.Module) -> dict[str, Any]:
    """Forward kwargs that skip the LM head on all but the last position (``logits_to_keep=1``) where the model
    accepts them: for passes that only read activations through hooks (the hooked values do not change)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def quantile_dim0(x: Tensor, q: float) -> Tensor:
    """``torch.quantile(x, q, dim=0)`` (linear interpolation), bit for bit, from two order statistics.

    ``torch.quantile`` sorts every column of the strided (P, F) tensor, which took minutes for a model's MLP
    activations on a 2-core CPU; ``topk`` (q near 1) or ``kthvalue`` on contiguous rows gives the same values.
    """
    n = x.shape[0]
    rank = torch.tensor(q, dtype=x.dtype) * (n - 1)  # torch.quantile computes the rank in x's dtype
    lo, hi = int(rank.floor()), int(rank.ceil())
    weight = rank - lo
    if n - lo <= n // 2:  # the upper tail: the (n - lo) largest values hold both order statistics
        top = x.topk(n - lo, dim=0).values  # (n - lo, F), descending
        below, above = top[-1], top[n - 1 - hi]
    else:
        xt = x.T.contiguous()  # (F, P)
        below, above = xt.kthvalue(lo + 1, dim=-1).values, xt.kthvalue(hi + 1, dim=-1).values
    return torch.lerp(below, above, weight.to(x.device))


def _real_rows(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T) mask -> (first-position bool (B, T), other-real bool (B, T)) under left padding."""
    first_idx = mask.long().argmax(dim=1)  # (B,)
    first = torch.zeros_like(mask, dtype=torch.bool)
    first[torch.arange(mask.shape[0]), first_idx] = True
    return first, mask.bool() & ~first


@torch.no_grad()
def neuron_stats(model: nn.Module, seqs: Sequence[Sequence[int]], *, batch_size: int = 8, q: float = 0.999,
                 adapter: ModelAdapter | None = None) -> NeuronStats:
    """First-token versus other-position MLP activations of every layer on ``seqs`` (left-padded batches)."""
    a = adapter or get_adapter(model)
    device = next(model.parameters()).device
    pad = int(getattr(model.config, "pad_token_id", None) or 0)
    firsts: dict[int, list[Tensor]] = {}
    others: dict[int, list[Tensor]] = {}
    state: dict[str, Tensor] = {}

    def grab(l: int, x: Tensor) -> None:
        x = x.detach().float()
        B, T = state["first"].shape
        x = x.reshape(B, T, -1)
        firsts.setdefault(l, []).append(x[state["first"]].abs())
        others.setdefault(l, []).append(x[state["other"]])

    hooks = [(a.mlp_down_module(l), (lambda x, l=l: grab(l, x)), True) for l in range(a.n_layers)
             if a.mlp_down_module(l) is not None]
    with forward_hooks(hooks):
        for s in range(0, len(seqs), batch_size):
            ids, mask = left_pad(seqs[s:s + batch_size], pad, device)
            state["first"], state["other"] = _real_rows(mask)
            model(input_ids=ids, attention_mask=mask, use_cache=False, **few_logits(model))
    first, omax, oq, omed = [], [], [], []
    for l in range(a.n_layers):
        if l not in firsts:
            first.append(torch.zeros(0)), omax.append(torch.zeros(0)), oq.append(torch.zeros(0))
            omed.append(torch.zeros(0))
            continue
        f = torch.cat(firsts[l]).mean(0)
        o = torch.cat(others[l])  # (P, F)
        first.append(f.cpu())
        omax.append(o.abs().max(0).values.cpu())
        oq.append(quantile_dim0(o.abs()[: min(len(o), 16384)], q).cpu())
        omed.append(o.median(0).values.cpu())
    n = sum(len(x) for x in others.get(0, []))
    return NeuronStats(first, omax, oq, omed, n)


@torch.no_grad()
def neuron_activations(model: nn.Module, ids: Sequence[int], neurons: Sequence[tuple[int, int]],
                       adapter: ModelAdapter | None = None) -> Tensor:
    """Signed activations of ``neurons`` [(layer, index), ...] at every position of one sequence: (N, T)."""
    a = adapter or get_adapter(model)
    device = next(model.parameters()).device
    by_layer: dict[int, list[int]] = {}
    for l, j in neurons:
        by_layer.setdefault(l, []).append(j)
    got: dict[int, Tensor] = {}

    def grab(l: int, x: Tensor) -> None:
        got[l] = x.detach().float().reshape(1, len(ids), -1)[0][:, by_layer[l]].T.cpu()  # (n_l, T)

    hooks = [(a.mlp_down_module(l), (lambda x, l=l: grab(l, x)), True) for l in by_layer]
    with forward_hooks(hooks):
        model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False)
    rows = []
    for l, j in neurons:
        rows.append(got[l][by_layer[l].index(j)])
    return torch.stack(rows) if rows else torch.zeros(0, len(ids))


@torch.no_grad()
def head_output_norms(model: nn.Module, ids: Sequence[int], adapter: ModelAdapter | None = None) -> Tensor:
    """||head output|| (input of the output projection, per head) at every position: (L, H, T)."""
    a = adapter or get_adapter(model)
    device = next(model.parameters()).device
    out: dict[int, Tensor] = {}

    def grab(l: int, x: Tensor) -> None:
        x = x.detach().float().reshape(1, len(ids), a.n_heads, -1)[0]  # (T, H, D)
        out[l] = x.norm(dim=-1).T.cpu()  # (H, T)

    hooks = [(output_projection(a, l), (lambda x, l=l: grab(l, x)), True) for l in a.attention_layers]
    with forward_hooks(hooks):
        model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False)
    return torch.stack([out[l] for l in a.attention_layers])


def save_neuron_stats(stats: NeuronStats, path: str) -> None:
    torch.save({"first": stats.first, "other_max": stats.other_max, "other_q": stats.other_q,
                "other_median": stats.other_median, "n_positions": stats.n_positions}, path)


def load_neuron_stats(path: str) -> NeuronStats:
    d = torch.load(path, weights_only=True)
    return NeuronStats(d["first"], d["other_max"], d["other_q"], d["other_median"], int(d["n_positions"]))
