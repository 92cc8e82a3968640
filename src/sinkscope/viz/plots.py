"""Figures of a `sinkscope.profile.SinkProfile`: each function takes data and returns a matplotlib Figure (no file
I/O)."""

from __future__ import annotations

from typing import Any, Protocol

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from sinkscope.metrics.sink import is_sink


class SinkProfile(Protocol):
    """What these figures read of a `sinkscope.profile.SinkProfile` (whose ``save`` draws them: the figures sit
    below the profile and name only what they use)."""

    model: dict[str, Any]
    inputs: dict[str, Any]
    attention_layers: list[int]
    lengths: np.ndarray
    residual_norm: np.ndarray
    sink_mass: np.ndarray | None
    eps: float
    massive: list[dict[str, Any]]

    def alpha_mean(self, k: int = 0, *, proxy: bool = False) -> np.ndarray: ...

    def head_is_sink(self, k: int = 0, eps: float | None = None, *, proxy: bool = False) -> np.ndarray: ...

    def sink_ratio(self, k: int = 0, eps: float | None = None, *, proxy: bool = False) -> float: ...

    def sink_ratio_by_position(self, eps: float | None = None, *, proxy: bool = False) -> np.ndarray: ...

    def residual_norm_median_other(self) -> np.ndarray: ...

    def residual_ratio(self) -> np.ndarray: ...

    def value_ratio(self) -> np.ndarray: ...


def _title(profile: SinkProfile, what: str) -> str:
    name = profile.model.get("source", {}).get("spec") or profile.model.get("model_type", "")
    return f"{what}\n{name}, {profile.inputs.get('kind')} input, BOS prepended: {profile.inputs.get('bos_prepended')}"


def _finish(fig: Figure, ax, profile: SinkProfile, title: str, ylabel: str) -> Figure:
    """Shared finishing of the by-layer line plots: labels, title, legend, grid."""
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(_title(profile, title), fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def sink_heatmap(profile: SinkProfile, k: int = 0) -> Figure:
    """Layer x head heatmap of alpha_k (mean attention on key k), with heads above eps marked."""
    a = profile.alpha_mean(k)  # (La, H)
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * a.shape[1] + 2), max(3, 0.22 * a.shape[0] + 1.5)))
    im = ax.imshow(a, aspect="auto", cmap="magma", vmin=0, vmax=1, origin="lower")
    ys, xs = np.nonzero(is_sink(a, profile.eps))
    ax.scatter(xs, ys, marker=".", s=8, c="cyan", label=f"alpha > {profile.eps}")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(profile.attention_layers)))
    ax.set_yticklabels(profile.attention_layers, fontsize=6)
    ax.set_title(_title(profile, f"attention sink score alpha_{k} (Sink ratio {profile.sink_ratio(k):.2f})"),
                 fontsize=9)
    fig.colorbar(im, ax=ax, label=f"alpha_{k}")
    ax.legend(loc="upper right", fontsize=7, framealpha=0.6)
    fig.tight_layout()
    return fig


def residual_norm_by_layer(profile: SinkProfile) -> Figure:
    """Residual-stream norm after each layer: the first token vs the median of the other tokens (log scale)."""
    L = profile.residual_norm.shape[1]
    first = np.nanmean(profile.residual_norm[..., 0], axis=0)
    others = profile.residual_norm_median_other()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(L), first, "o-", label="token 0 (sink)")
    ax.plot(range(L), others, "s-", label="median other token")
    ax.set_yscale("log")
    return _finish(fig, ax, profile, "residual-state norm by layer", "||x[l, t]||")


def attention_on_first_by_layer(profile: SinkProfile) -> Figure:
    """Mean attention on token 0 (alpha_0 averaged over heads) and the share of sink heads, by layer."""
    a = np.nanmean(profile.alpha_mean(0), axis=1)
    r = profile.head_is_sink(0)[profile.lengths > 0].mean(axis=(0, 2))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(profile.attention_layers, a, "o-", label="mean alpha_0 over heads")
    ax.plot(profile.attention_layers, r, "s--", label=f"share of heads with alpha_0 > {profile.eps}")
    if profile.sink_mass is not None:
        ax.plot(profile.attention_layers, np.nanmean(profile.sink_mass, axis=(0, 2)), "^:", label="learned sink mass")
    ax.set_ylim(0, 1.02)
    return _finish(fig, ax, profile, "attention on token 0 by layer", "attention")


PLOTS = {
    "sink_heatmap.png": sink_heatmap,
    "residual_norm_by_layer.png": residual_norm_by_layer,
    "attention_on_first_by_layer.png": attention_on_first_by_layer,
}
