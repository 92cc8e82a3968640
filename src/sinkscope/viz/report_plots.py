"""Figures of `sinkscope report` that compare input kinds or domains (the single-profile plots are in
`sinkscope.viz.plots`). Each function takes data and returns a matplotlib Figure (no file I/O)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from sinkscope.viz.plots import SinkProfile


class DormancyReport(Protocol):
    """What the dormancy figure reads of a `sinkscope.analyses.dormant.DormancyReport` (data in, Figure out: the
    measuring modules sit above this package)."""

    domains: list[str]
    alpha0: np.ndarray  # (D, La, H) mean alpha_0 per domain

    def dependence(self) -> np.ndarray: ...  # (La, H) range of alpha_0 over the domains


def sinks_by_kind(profiles: Mapping[str, SinkProfile], n_positions: int = 8) -> Figure:
    """Left: ``Sink_k^eps`` for the first ``n_positions`` key positions, one bar group per input kind.
    Right: share of sink heads (alpha_0 > eps) by layer for each kind: where the sink forms."""
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.6))
    kinds = list(profiles)
    width = 0.8 / max(1, len(kinds))
    for i, kind in enumerate(kinds):
        p = profiles[kind]
        r = p.sink_ratio_by_position()[:n_positions]
        ax0.bar(np.arange(len(r)) + i * width - 0.4 + width / 2, r, width, label=kind)
        share = p.head_is_sink(0)[p.lengths > 0].mean(axis=(0, 2))  # (La,)
        ax1.plot(p.attention_layers, share, "o-", ms=3, label=kind)
    eps = next(iter(profiles.values())).eps if profiles else 0.3
    ax0.set_xlabel("key position k")
    ax0.set_ylabel(f"Sink_k^{eps}")
    ax0.set_ylim(0, 1.02)
    ax0.set_title("share of heads for which position k is a sink", fontsize=9)
    ax0.legend(fontsize=8)
    ax1.set_xlabel("layer")
    ax1.set_ylabel(f"share of heads with alpha_0 > {eps}")
    ax1.set_ylim(0, 1.02)
    ax1.set_title("where the token-0 sink forms, by layer", fontsize=9)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    return fig


def alpha0_heatmaps(profiles: Mapping[str, SinkProfile]) -> Figure:
    """One layer x head heatmap of alpha_0 per input kind, side by side (same colour scale, 0..1)."""
    kinds = list(profiles)
    La, H = next(iter(profiles.values())).alpha.shape[1:3]
    fig, axes = plt.subplots(1, len(kinds), figsize=(max(4.0, (0.3 * H + 1.2) * len(kinds) + 1),
                                                      max(3.0, 0.16 * La + 1.4)), squeeze=False)
    im = None
    for ax, kind in zip(axes[0], kinds):
        p = profiles[kind]
        im = ax.imshow(p.alpha_mean(0), aspect="auto", cmap="magma", vmin=0, vmax=1, origin="lower")
        ax.set_title(f"{kind}: Sink_0 = {p.sink_ratio(0):.2f}", fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), label="alpha_0 (mean attention on token 0)", shrink=0.9)
    return fig


def norms_by_layer(profiles: Mapping[str, SinkProfile]) -> Figure:
    """Left: residual norm of token 0 over the median token, by layer, per kind (log scale).
    Right: value norm of token 0 over the median token (mean over kv heads), by layer, per kind."""
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.6))
    for kind, p in profiles.items():
        ax0.plot(range(p.residual_norm.shape[1]), p.residual_ratio(), "o-", ms=3, label=kind)
        ax1.plot(p.attention_layers, np.nanmean(p.value_ratio(), axis=1), "o-", ms=3, label=kind)
    for ax in (ax0, ax1):
        ax.set_yscale("log")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax0.set_ylabel("||x[l, 0]|| / median_t ||x[l, t]||")
    ax0.set_title("residual-state peak: token 0 vs ordinary tokens", fontsize=9)
    ax1.set_ylabel("||v[l, 0]|| / median_t ||v[l, t]||")
    ax1.set_title("value-state drain: token 0 vs ordinary tokens (< 1 = drain)", fontsize=9)
    fig.tight_layout()
    return fig


def massive_by_layer(profile: SinkProfile) -> Figure:
    """Largest |hidden entry| per layer against the median |entry| (log scale), labelled with its dimension."""
    layers = [m["layer"] for m in profile.massive]
    top = [m["top"][0]["value"] if m["top"] else np.nan for m in profile.massive]
    med = [m["median_abs"] for m in profile.massive]
    fig, ax = plt.subplots(figsize=(9, 3.4))
    ax.semilogy(layers, top, "o-", ms=3, label="largest |x[l, t, d]|")
    ax.semilogy(layers, med, "s-", ms=3, label="median |x[l, t, d]|")
    last = None
    for m in profile.massive:
        if m["top"] and m["massive"] and m["top"][0]["dim"] != last:
            last = m["top"][0]["dim"]
            ax.annotate(f"d{last}", (m["layer"], m["top"][0]["value"]), fontsize=7, xytext=(2, 4),
                        textcoords="offset points")
    return _finish(fig, ax, "layer", "|activation|",
                   "massive activations in the residual stream (labels: hidden dimension)")


def dormancy_heatmaps(report: DormancyReport) -> Figure:
    """alpha_0 per head on each domain, then the dependence (max - min over domains), layer x head."""
    D = len(report.domains)
    La, H = report.alpha0.shape[1:]
    fig, axes = plt.subplots(1, D + 1, figsize=(max(5.0, (0.3 * H + 1.2) * (D + 1) + 1.5),
                                                max(3.0, 0.16 * La + 1.4)), squeeze=False)
    im = None
    for d, name in enumerate(report.domains):
        ax = axes[0, d]
        im = ax.imshow(report.alpha0[d], aspect="auto", cmap="magma", vmin=0, vmax=1, origin="lower")
        ax.set_title(f"alpha_0 on {name}", fontsize=9)
        ax.set_xlabel("head")
        if d == 0:
            ax.set_ylabel("layer")
    ax = axes[0, D]
    im2 = ax.imshow(report.dependence(), aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
    ax.set_title("dependence on domain", fontsize=9)
    ax.set_xlabel("head")
    if im is not None:
        fig.colorbar(im, ax=list(axes[0, :D]), label="alpha_0", shrink=0.9)
    fig.colorbar(im2, ax=ax, label="max - min alpha_0", shrink=0.9)
    return fig


def divergence_vs_length(lengths: Sequence[int], rate: Sequence[float],
                         patched: Mapping[int, float] | None = None) -> Figure:
    """Share of diverged continuations against the number of repeated tokens (log x); ``patched`` maps
    lengths to the rate with the sink-circuit patch installed."""
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    ax.plot(lengths, rate, "o-", label="model")
    if patched:
        xs = sorted(patched)
        ax.plot(xs, [patched[x] for x in xs], "s--", ms=9, label="with the shipped patch")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    return _finish(fig, ax, "repetitions of the word", "divergence rate", "repeated-token divergence")


def _finish(fig: Figure, ax: Any, xlabel: str, ylabel: str, title: str) -> Figure:
    """The line plots' labels, small title, grid and legend, laid out."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
