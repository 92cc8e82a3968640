"""How much the tokens of a repeated run look like token 0 (the true sink), layer by layer.

For one prompt, measured in one pass of the sink profiler plus hooks (shapes: L layers, R run positions):
attention mass each run position receives (alpha, Gu et al.) against token 0's, residual norm relative to token 0,
cosine of the hidden state to token 0's, and the activation of token 0's top MLP neuron relative to token 0's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from sinkscope.hooks import forward_hooks
from sinkscope.metrics.sink import is_sink
from sinkscope.models.adapters import ModelAdapter, get_adapter
from sinkscope.profile import profile_sinks


@dataclass
class RunSinkness:
    """Per-layer sinkness of a run (means over the run's last ``tail`` positions) and per-position curves.

    Attributes:
        alpha_run / alpha_first: (La,) mean over heads of the attention mass a run position / token 0 receives.
        norm_ratio: (L,) ||x[l, t]|| / ||x[l, 0]||.
        cos_first: (L,) cos(x[l, t], x[l, 0]).
        neuron_ratio: (L,) |a_j(t)| / |a_j(0)| for token 0's top neuron j of each layer.
        sink_share: (La,) share of heads for which the run position is a sink (alpha > eps).
        positions: (P,) sampled run positions; cos_curve: (L, P) cos(x[l, t], x[l, 0]) there.
    """

    alpha_run: np.ndarray
    alpha_first: np.ndarray
    norm_ratio: np.ndarray
    cos_first: np.ndarray
    neuron_ratio: np.ndarray
    sink_share: np.ndarray
    positions: np.ndarray
    cos_curve: np.ndarray

    def summary(self) -> dict[str, Any]:
        """Scalars for a CSV row: maxima over layers (where the run looks most like token 0)."""
        return {"alpha_run_max": float(np.nanmax(self.alpha_run)), "norm_ratio_max": float(np.nanmax(self.norm_ratio)),
                "cos_first_max": float(np.nanmax(self.cos_first[1:])) if len(self.cos_first) > 1 else float("nan"),
                "neuron_ratio_max": float(np.nanmax(self.neuron_ratio)),
                "sink_share_max": float(np.nanmax(self.sink_share))}

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k).tolist() for k in ("alpha_run", "alpha_first", "norm_ratio", "cos_first",
                                                       "neuron_ratio", "sink_share", "positions", "cos_curve")}


@torch.no_grad()
def run_sinkness(model: nn.Module, ids: list[int], run_start: int, *, tail: int = 32, eps: float = 0.3,
                 curve_points: int = 24, adapter: ModelAdapter | None = None) -> RunSinkness:
    """Sinkness of the run ``ids[run_start:]`` of one prompt (see `RunSinkness`; ``adapter``: the model's, if
    the caller resolved it already)."""
    a = adapter or get_adapter(model)
    T = len(ids)
    run = np.arange(run_start, T)
    last = run[-min(tail, len(run)):]
    pts = np.unique(np.round(np.geomspace(max(run_start, 1), T - 1, num=min(curve_points, len(run)))).astype(int))
    cos_all: dict[int, torch.Tensor] = {}
    neuron: dict[int, torch.Tensor] = {}

    def resid(l: int, x: torch.Tensor) -> None:
        x = x[0].detach().float()  # (T, D)
        cos_all[l] = torch.nn.functional.cosine_similarity(x, x[:1], dim=-1).cpu()  # (T,)

    def mlp(l: int, x: torch.Tensor) -> None:
        x = x[0].detach().float().abs()  # (T, F)
        j = int(x[0].argmax())
        neuron[l] = (x[:, j] / x[0, j].clamp_min(1e-9)).cpu()  # (T,)

    hooks: list[tuple[nn.Module, Any, bool]] = [(m, (lambda x, l=l: resid(l, x)), False)
                                                for l, m in enumerate(a.layer_modules)]
    hooks += [(a.mlp_down_module(l), (lambda x, l=l: mlp(l, x)), True) for l in range(a.n_layers)
              if a.mlp_down_module(l) is not None]
    with forward_hooks(hooks):
        prof = profile_sinks(model, [ids], eps=eps, batch_size=1, adapter=a)
    alpha = prof.alpha[0]  # (La, H, T)
    res = prof.residual_norm[0]  # (L, T)
    L = a.n_layers
    cos = torch.stack([cos_all[l] for l in range(L)]).numpy()  # (L, T)
    nr = np.array([float(neuron[l][last].mean()) if l in neuron else np.nan for l in range(L)])
    return RunSinkness(
        alpha_run=alpha[:, :, last].mean(axis=(1, 2)), alpha_first=alpha[:, :, 0].mean(axis=1),
        norm_ratio=(res[:, last] / res[:, :1]).mean(axis=1), cos_first=cos[:, last].mean(axis=1),
        neuron_ratio=nr, sink_share=is_sink(alpha[:, :, last], eps).mean(axis=(1, 2)), positions=pts,
        cos_curve=cos[:, pts])
