"""Plots of training dynamics: loss, sink ratio, attention on the first token, its value and residual norms."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def plot_dynamics(rows: list[dict[str, Any]], title: str = "") -> Figure:
    """Five panels over training steps from ``metrics.jsonl`` rows (data -> Figure, no I/O)."""
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 5, figsize=(22, 4))
    ax = axes[0]
    ax.plot(steps, [r["loss"] for r in rows], label="eval loss")
    for key in ("loss_copy", "loss_bigram", "excess_loss"):
        if key in rows[-1]:
            ax.plot(steps, [r.get(key) for r in rows], label=key.replace("loss_", ""))
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_title("loss (nats)")
    ax.legend(fontsize=7)
    ax = axes[1]
    for key in ("sink_ratio", "sink_ratio_proxy", "sink_ratio_slot"):
        if key in rows[-1]:
            ax.plot(steps, [r.get(key) for r in rows], label=key)
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Sink_0 (eps 0.3)")
    ax.legend(fontsize=7)
    panels = [("bos_attention", "mean attention on first token"), ("bos_value_norm", "first-token value norm / median"),
              ("bos_residual_norm", "first-token residual norm / median")]
    for ax, (key, label) in zip(axes[2:], panels):
        n_layers = len(rows[-1][key])
        for layer in range(n_layers):
            vals = [r[key][layer] for r in rows]
            if isinstance(vals[0], list):
                vals = [sum(v) / len(v) for v in vals]
            ax.plot(steps, vals, label=f"layer {layer}")
        ax.set_title(label)
        ax.legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | Path) -> None:
    """Write a figure as PNG through a temporary file (atomic) and close it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)
    plt.close(fig)
