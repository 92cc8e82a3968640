"""Sink keys act as key biases (Gu et al. 2410.10781): cosine between every query and chosen sink keys.

`qk_alignment` runs one forward pass with an attention observer that keeps, per layer and head, the
distribution of ``cos(q[t], k[sink])`` over the queries that can see each sink position (after RoPE, with GQA
groups expanded), next to the same distribution for the keys that are not sinks. Memory is O(T * n_sinks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sinkscope.capture import observe_attention
from sinkscope.devices import model_device
from sinkscope.errors import InputError
from sinkscope.models.adapters import ModelAdapter, get_adapter, has_adapter
from sinkscope.profile import SinkProfile

#: Histogram bin edges of the cosine distributions.
COS_BINS = np.linspace(-1.0, 1.0, 41)


@dataclass
class QKAlignment:
    """Cosine of queries with sink keys.

    Attributes:
        positions: the sink key positions measured.
        attention_layers: layer indices of the rows.
        mean: (La, H, S) mean cos(q_t, k_s) over queries t > s.
        hist: (La, S, len(COS_BINS) - 1) counts over heads and queries.
        mean_other: (La, H) mean cos(q_t, k_j) over a sample of non-sink keys j < t.
    """

    positions: list[int]
    attention_layers: list[int]
    mean: np.ndarray
    hist: np.ndarray
    mean_other: np.ndarray

    def to_json(self) -> dict[str, Any]:
        return {"positions": self.positions, "attention_layers": self.attention_layers,
                "mean_by_layer": self.mean.mean(axis=1).tolist(), "mean": self.mean.tolist(),
                "mean_other_by_layer": self.mean_other.mean(axis=1).tolist(),
                "hist_bins": COS_BINS.tolist(), "hist": self.hist.tolist()}


class _AlignmentObserver:
    def __init__(self, layer_of: dict[int, int], positions: list[int], n_other: int) -> None:
        self.layer_of, self.positions, self.n_other = layer_of, positions, n_other
        self.results: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    def observe(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                scaling: float, **kwargs: Any) -> None:
        layer = self.layer_of.get(id(module))
        if layer is None:
            return None
        G = query.shape[1] // key.shape[1]
        q = torch.nn.functional.normalize(query[0].float(), dim=-1)  # (H, T, D)
        k = torch.nn.functional.normalize(key[0].float(), dim=-1).repeat_interleave(G, dim=0)  # (H, T, D)
        T = q.shape[1]
        pos = torch.tensor(self.positions)
        cos = q @ k[:, pos].transpose(-1, -2)  # (H, T, S)
        after = torch.arange(T)[:, None] > pos[None, :]  # (T, S): queries that come after the sink
        mean = (cos * after).sum(1) / after.sum(0).clamp_min(1)
        hist = torch.stack([torch.histc(cos[:, after[:, s], s].flatten(), bins=len(COS_BINS) - 1, min=-1, max=1)
                            for s in range(len(self.positions))])
        sinks = set(self.positions)
        others = [j for j in np.linspace(0, T - 2, min(self.n_other, T - 1)).astype(int).tolist() if j not in sinks]
        if others:
            o = torch.tensor(sorted(set(others)))
            c_o = q @ k[:, o].transpose(-1, -2)  # (H, T, n)
            vis = torch.arange(T)[:, None] > o[None, :]
            mean_o = (c_o * vis).sum((1, 2)) / vis.sum().clamp_min(1)
        else:
            mean_o = torch.full((q.shape[0],), float("nan"))
        self.results[layer] = (mean, hist, mean_o)
        return None


@torch.no_grad()
def qk_alignment(model: nn.Module, ids: list[int], positions: list[int] | None = None,
                 n_other: int = 64, adapter: ModelAdapter | None = None) -> QKAlignment:
    """Cosine between queries and the keys at ``positions`` (default: the first token) in one sequence.

    Args:
        model: a supported HF causal LM.
        ids: one token sequence.
        positions: sink key positions (e.g. ``[p["position"] for p in profile.top_sinks()]``).
        n_other: how many evenly spaced non-sink keys to use as the comparison baseline.
        adapter: the model's adapter, if the caller resolved it already.

    Shapes: see `QKAlignment`.
    """
    positions = sorted(set(positions or [0]))
    if not ids:
        raise InputError("empty input")
    if positions[0] < 0 or positions[-1] >= len(ids) - 1:
        raise InputError(f"sink positions must lie in [0, {len(ids) - 2}] for a {len(ids)}-token input")
    adapter = adapter or get_adapter(model)
    layer_of = {id(adapter.attention_module(l)): l for l in adapter.attention_layers}
    obs = _AlignmentObserver(layer_of, positions, n_other)
    device = model_device(model)
    with observe_attention(model, obs):
        model(input_ids=torch.tensor([ids], device=device), use_cache=False)
    layers = adapter.attention_layers
    return QKAlignment(
        positions, layers,
        np.stack([obs.results[l][0].cpu().numpy() for l in layers]),
        np.stack([obs.results[l][1].cpu().numpy() for l in layers]),
        np.stack([obs.results[l][2].cpu().numpy() for l in layers]),
    )


def attach_qk_alignment(profile: SinkProfile, model: nn.Module, sequence: list[int], *, n_sinks: int = 3,
                        adapter: ModelAdapter | None = None) -> SinkProfile:
    """Add Gu et al.'s q-k alignment of the profile's top sinks (at most ``n_sinks``, those before the last
    position of ``sequence``, the first sample) to ``profile.analyses["qk_alignment"]``; what `sinkscope scan`
    writes. A profile with no such sink, or of a model without an adapter, is returned unchanged."""
    positions = [int(p["position"]) for p in profile.top_sinks(n_sinks) if p["position"] < len(sequence) - 1]
    if positions and (adapter is not None or has_adapter(model)):
        profile.analyses["qk_alignment"] = qk_alignment(model, sequence, positions, adapter=adapter).to_json()
    return profile
