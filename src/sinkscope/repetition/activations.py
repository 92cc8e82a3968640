"""MLP-neuron activation statistics: token 0 versus every other position.

The MLP "neuron" activation of layer ``l`` is the input of its down projection (``act(gate) * up``, shape
(B, T, F)).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sinkscope.capture import forward_hooks
from sinkscope.inputs import first_and_other, pad_batch
from sinkscope.io import write_atomic
from sinkscope.models.adapters import ModelAdapter, get_adapter, model_device, pad_token_id


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
            model(input_ids=ids, attention_mask=mask, use_cache=False)
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
        oq.append(torch.quantile(o.abs()[: min(len(o), 16384)], q, dim=0).cpu())
        omed.append(o.median(0).values.cpu())
    n = sum(len(x) for x in others.get(0, []))
    return NeuronStats(first, omax, oq, omed, n)


def save_neuron_stats(stats: NeuronStats, path: str) -> None:
    """Write the statistics as a tensors-only file (read back with ``weights_only=True``), atomically."""
    buf = io.BytesIO()
    torch.save({"first": stats.first, "other_max": stats.other_max, "other_q": stats.other_q,
                "other_median": stats.other_median, "n_positions": stats.n_positions}, buf)
    write_atomic(path, buf.getvalue())


def load_neuron_stats(path: str) -> NeuronStats:
    """Statistics written by `save_neuron_stats`."""
    d = torch.load(path, map_location="cpu", weights_only=True)
    return NeuronStats(d["first"], d["other_max"], d["other_q"], d["other_median"], int(d["n_positions"]))
