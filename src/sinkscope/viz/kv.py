"""Figures of the per-head KV policies (`sinkscope.kv`): the layer x kv-head map and the budget line of a policy,
and `kv eval`'s quality against stored bytes; data in, ``Figure`` out (arrays and rows, no policy objects, so this
module stays at the bottom of the import layers)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure


def kv_head_map(distant: np.ndarray, full: np.ndarray, *, budget: float | None = None,
                annotate: bool | None = None) -> Figure:
    """The layer x kv-head map of a policy: each head's distant mass as the colour (and the number), the heads
    that keep the full cache outlined in black, the streaming ones plain.

    Args:
        distant: (L, Hkv) distant attention mass per kv head (summed over its query heads; 0 .. G).
        full: (L, Hkv) bool, True where the head keeps every token.
        budget: the policy's budget, for the title (fraction of the dense cache's bytes).
        annotate: write the numbers in the cells (default: when the map has at most 400 cells).
    """
    distant = np.asarray(distant, dtype=float)
    full = np.asarray(full, dtype=bool)
    if distant.shape != full.shape or distant.ndim != 2:
        raise ValueError(f"distant {distant.shape} and full {full.shape} must be the same (L, Hkv) shape")
    L, H = distant.shape
    annotate = distant.size <= 400 if annotate is None else annotate
    fig, ax = plt.subplots(figsize=(min(max(5.5, 2.2 + 0.9 * H), 12), min(1.8 + 0.28 * L, 12)))
    im = ax.imshow(distant, aspect="auto", cmap="viridis", interpolation="nearest",
                   vmin=0.0, vmax=max(float(np.nanmax(distant)) if distant.size else 1.0, 1e-9))
    for layer, head in zip(*np.nonzero(full)):
        ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black", lw=2.2))
    if annotate:
        hi = float(np.nanmax(distant)) if distant.size else 1.0
        for (layer, head), v in np.ndenumerate(distant):
            colour = "black" if v > 0.6 * hi else "white"
            ax.text(head, layer, f"{v:.2f}" + (" F" if full[layer, head] else ""), ha="center", va="center",
                    fontsize=7, color=colour)
    ax.set_xticks(range(H))
    ax.set_xlabel("kv head")
    ax.set_ylabel("layer")
    n_full = int(full.sum())
    title = f"distant mass per kv head\noutlined (F): full cache, {n_full} of {full.size}"
    if budget is not None:
        title += f", budget {100 * budget:.1f}%"
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="distant mass (sum over the query heads)")
    fig.tight_layout()
    return fig


def kv_budget_line(bytes_fraction: Sequence[float], kl: Sequence[float], *,
                   labels: Sequence[str] | None = None) -> Figure:
    """Measured quality against stored bytes: mean next-token KL(dense || policy) in nats/token against the
    stored KV bytes as a share of the dense cache's (a point per policy, ``labels`` beside them)."""
    x = np.asarray(bytes_fraction, dtype=float)
    y = np.asarray(kl, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"{x.size} byte fractions but {y.size} KL values")
    order = np.argsort(x)
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    ax.plot(100 * x[order], y[order], "o-", label="per-head policy (measured)")
    for i, text in enumerate(labels or []):
        ax.annotate(text, (100 * x[i], y[i]), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.set_xlabel("stored KV bytes (% of the dense cache)")
    ax.set_ylabel("KL(dense || policy), nats/token")
    ax.set_title("quality against KV bytes", fontsize=9)
    ax.set_ylim(bottom=0.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


#: panels: (summary field, y label)
PANELS: tuple[tuple[str, str], ...] = (
    ("passkey_acc", "passkey accuracy"),
    ("multikey_acc", "multi-key accuracy"),
    ("stream_kl", "mean KL to dense (nats/token)"),
    ("agreement", "greedy agreement with dense"),
)


def plot_quality_vs_bytes(rows: Sequence[dict[str, Any]], length: int | None = None) -> Figure:
    """Quality against stored KV bytes (fraction of the dense cache's), one line per method.

    Args:
        rows: `sinkscope.kv.evaluate.summarize` rows (``method``, ``length``, ``bytes_fraction`` and the panel
            fields); dense is drawn as a horizontal reference line at its value.
        length: which prompt length to draw (default: the longest in ``rows``).
    """
    lengths = sorted({r["length"] for r in rows})
    length = length if length is not None else (lengths[-1] if lengths else None)
    sel = [r for r in rows if r["length"] == length]
    methods = list(dict.fromkeys(r["method"] for r in sel))
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.0 * len(PANELS), 3.6))
    for ax, (fieldname, ylabel) in zip(axes, PANELS):
        for i, m in enumerate(methods):
            pts = sorted((r["bytes_fraction"], r[fieldname]) for r in sel if r["method"] == m
                         and r.get(fieldname) is not None and r.get("bytes_fraction") is not None)
            if not pts:
                continue
            if m == "dense":
                if fieldname != "stream_kl":  # dense's KL to itself is 0: no place on a log axis
                    ax.axhline(pts[0][1], color="black", lw=1, ls="--", label="dense")
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", lw=1.4, label=m, color=f"C{i}", alpha=0.85)
        ax.set_xlabel("stored KV bytes / dense")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        if fieldname == "stream_kl":
            ax.set_yscale("log")
        else:
            ax.set_ylim(-0.05, 1.05)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"KV-cache methods at equal bytes, {length}-token prompts", fontsize=10)
    fig.tight_layout()
    return fig
