"""MLP-neuron activation statistics: token 0 versus every other position.

The MLP "neuron" activation of layer ``l`` is the input of its down projection (``act(gate) * up``, shape
(B, T, F)).
"""

from __future__ import annotations

import inspect
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sinkscope.capture import forward_hooks
from sinkscope.devices import model_device
from sinkscope.errors import InputError
from sinkscope.inputs import first_and_other, pad_batch
from sinkscope.io import write_atomic
from sinkscope.models.adapters import ModelAdapter, get_adapter, pad_token_id


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


@torch.no_grad()
def neuron_stats(model: nn.Module, seqs: Sequence[Sequence[int]], *, batch_size: int = 8, q: float = 0.999,
                 adapter: ModelAdapter | None = None) -> NeuronStats:
    """First-token versus other-position MLP activations of every layer on ``seqs`` (left-padded batches)."""
    a = adapter or get_adapter(model)
    device = model_device(model)
    pad = pad_token_id(model)
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
            ids, mask = pad_batch(seqs[s:s + batch_size], pad, side="left", device=device)
            state["first"], state["other"] = first_and_other(mask)
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


def save_neuron_stats(stats: NeuronStats, path: str | Path) -> None:
    """Write the statistics as a tensors-only file (read back with ``weights_only=True``), atomically."""
    buf = io.BytesIO()
    torch.save({"first": stats.first, "other_max": stats.other_max, "other_q": stats.other_q,
                "other_median": stats.other_median, "n_positions": stats.n_positions}, buf)
    write_atomic(path, buf.getvalue())


def load_neuron_stats(path: str | Path) -> NeuronStats:
    """Statistics written by `save_neuron_stats` (tensors only: a file holding other pickled objects is refused,
    never run).

    Raises:
        InputError: missing file, pickled objects, not a tensor file, or not neuron statistics.
    """
    import pickle
    import zipfile

    p = Path(path)
    if not p.is_file():
        raise InputError(f"neuron statistics not found: {p}")
    try:
        d = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if zipfile.is_zipfile(p):  # a torch.save archive whose pickle names other objects
            raise InputError(f"{p} holds pickled objects other than tensors, which are refused (only a file "
                             "written by `repeat circuit` is read)") from None
        raise InputError(f"{p} is not a tensor file written by `repeat circuit`") from None
    except (RuntimeError, EOFError, ValueError, OSError, UnicodeDecodeError, AttributeError, ImportError):
        raise InputError(f"{p} is not a tensor file written by `repeat circuit`") from None
    keys = ("first", "other_max", "other_q", "other_median")
    ok = isinstance(d, dict) and all(k in d for k in (*keys, "n_positions"))
    ok = ok and all(isinstance(d[k], list) and all(isinstance(t, Tensor) for t in d[k]) for k in keys)
    ok = ok and len({len(d[k]) for k in keys}) == 1 and isinstance(d["n_positions"], int)
    if not ok:
        raise InputError(f"{p} is a tensor file but not neuron statistics (first, other_max, other_q, "
                         "other_median per layer, n_positions)")
    return NeuronStats(d["first"], d["other_max"], d["other_q"], d["other_median"], int(d["n_positions"]))
