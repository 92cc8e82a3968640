"""Plots of the repeated-token study (data in, matplotlib Figure out; `save_scan_figures` writes a scan's)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt  # the backend is chosen once, in sinkscope.viz
import numpy as np
from matplotlib.figure import Figure


def divergence_vs_length(summary: Sequence[dict[str, Any]]) -> Figure:
    """Divergence rate against repetition length N (log axis), one line per prompt form."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for form in sorted({r["form"] for r in summary}):
        rows = sorted((r for r in summary if r["form"] == form), key=lambda r: r["n"])
        ax.plot([r["n"] for r in rows], [r["rate"] for r in rows], marker="o", label=form)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("repetitions N")
    ax.set_ylabel("share of words that diverge")
    ax.set_title("Divergence rate vs repetition length")
    ax.legend()
    fig.tight_layout()
    return fig


def similarity_vs_position(cell: dict[str, Any], layers: Sequence[int] | None = None) -> Figure:
    """cos(x[l, t], x[l, 0]) against run position t, one line per layer, for one scanned cell."""
    s = cell["sinkness"]
    curve = np.asarray(s["cos_curve"])  # (L, P)
    pos = np.asarray(s["positions"])
    L = curve.shape[0]
    layers = list(layers) if layers is not None else sorted(set(np.linspace(0, L - 1, 8).astype(int).tolist()))
    fig, ax = plt.subplots(figsize=(6, 4))
    cmap = plt.get_cmap("viridis")
    for i, l in enumerate(layers):
        ax.plot(pos, curve[l], color=cmap(i / max(len(layers) - 1, 1)), label=f"layer {l}")
    ax.set_xscale("log")
    ax.set_xlabel("position in the prompt")
    ax.set_ylabel("cosine to token 0's hidden state")
    ax.set_title(f"{cell['form']} '{cell['word']}' x {cell['n']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def circuit_effects(components: Sequence[dict[str, Any]], top: int = 20) -> Figure:
    """Bar chart of the top components' causal effect on token 0's sink, with their firing on runs."""
    comps = list(components)[:top]
    names = [f"L{c['layer']}.{'N' if c['kind'] == 'neuron' else 'H'}{c['index']}" for c in comps]
    fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(comps)), 4))
    x = np.arange(len(comps))
    ax.bar(x - 0.2, [c["effect_residual"] for c in comps], 0.4, label="residual peak removed")
    ax.bar(x + 0.2, [c["effect_attention"] for c in comps], 0.4, label="attention on token 0 removed")
    fr = [c.get("fire_run", float("nan")) for c in comps]
    if not all(np.isnan(v) for v in fr):
        ax.plot(x, fr, "k^", label="fires on runs (share)")
    ax.set_xticks(x, names, rotation=70, fontsize=7)
    ax.set_ylabel("share (1 = all)")
    ax.set_title("Sink circuit: ablation at token 0")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def save_scan_figures(summary: Sequence[dict[str, Any]], cells: Sequence[dict[str, Any]], out_dir: str | Path) -> None:
    """``divergence_vs_length.png`` and, per prompt form, ``similarity_<form>.png`` of its longest run with a
    sinkness pass (what `repeat scan` writes), atomically."""
    from sinkscope.io import save_figure_atomic

    out = Path(out_dir)
    figs = [(out / "divergence_vs_length.png", divergence_vs_length(summary))]
    with_s = [c for c in cells if "sinkness" in c]
    for form in dict.fromkeys(c["form"] for c in cells):
        cs = [c for c in with_s if c["form"] == form]
        if cs:
            figs.append((out / f"similarity_{form}.png", similarity_vs_position(max(cs, key=lambda c: c["n"]))))
    for path, fig in figs:
        save_figure_atomic(path, fig)
        plt.close(fig)


def sink_run_figure(summary: Sequence[dict[str, Any]], curves: Sequence[dict[str, Any]],
                    layers: Sequence[int] | None = None, min_queries: int | None = None) -> Figure:
    """Yona et al.'s repeated token as a sink (`sinkscope.repetition.sink_run`), one colour per prompt form:
    (a) share of sinking heads per copy at the longest N (copies seen by fewer than ``min_queries`` queries
    shaded), (b) token 0's Sink_0 and the largest per-copy share against N, (c) the last copy's relative distance
    to the one-token sequence ``(x)`` against N at ``layers`` (default: first, a quarter, half, last)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    forms = list(dict.fromkeys(r["form"] for r in summary))
    colors = {f: plt.get_cmap("tab10")(i) for i, f in enumerate(forms)}
    n_layers = len(summary[0]["distance_by_layer"]) if summary else 0
    layers = list(layers) if layers is not None else sorted({0, n_layers // 4, n_layers // 2, n_layers - 1})
    styles = ["-", "--", ":", "-."]
    for f in forms:
        c = [r for r in curves if r["form"] == f]
        if c:
            axes[0].plot([r["copy"] for r in c], [r["mean_share"] for r in c], color=colors[f],
                         label=f"{f}, N = {c[0]['n']}")
            if min_queries is not None and min_queries > 1:
                axes[0].axvspan(c[0]["n"] - min_queries + 1.5, c[0]["n"] + 0.5, color="0.85", zorder=0)
        rows = sorted((r for r in summary if r["form"] == f), key=lambda r: r["n"])
        ns = [r["n"] for r in rows]
        axes[1].plot(ns, [r["mean_sink0"] for r in rows], marker="o", color=colors[f], label=f"{f}: Sink_0 (token 0)")
        axes[1].plot(ns, [np.nan if r["mean_max_share"] is None else r["mean_max_share"] for r in rows], marker="x",
                     ls="--", color=colors[f], label=f"{f}: largest share on a copy")
        for j, l in enumerate(layers):
            axes[2].plot(ns, [r["distance_by_layer"][l] for r in rows], marker="o", ms=3, ls=styles[j % len(styles)],
                         color=colors[f], label=f"{f}: layer {l}")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("copy index in the run (shaded: seen by too few queries to count)")
    axes[0].set_ylabel("share of heads with alpha > eps")
    axes[0].set_title("(a) is a copy a sink? (mean over words)")
    for ax in axes[1:]:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("run length N")
    axes[1].set_ylabel("share of heads with alpha > eps")
    axes[1].set_ylim(-0.02, 1.02)
    axes[1].set_title("(b) token 0 vs the copies")
    axes[2].set_ylabel("||h(last copy) - h((x))|| / ||h((x))||")
    axes[2].set_ylim(0, None)
    axes[2].set_title("(c) distance to the one-token sequence (Thm 4.1)")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
