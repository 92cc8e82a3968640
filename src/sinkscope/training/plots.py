"""Plots of training dynamics: loss, sink ratio, attention on the first token, its value and residual norms."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def plot_dynamics(rows: list[dict[str, Any]], title: str = "", eps: float | None = None) -> Figure:
    """Five panels over training steps from ``metrics.jsonl`` rows (data -> Figure, no I/O); ``eps``: the sink
    threshold the run measured with (``train.eps``), shown in the sink panel's title."""
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
    ax.set_title("Sink_0" if eps is None else f"Sink_0 (eps {eps:g})")
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
