"""The figure of `sinkscope kv eval`: quality against stored KV bytes, one line per method (data in, Figure out)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

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
