"""Figure of Guo et al.'s mutual-reinforcement dynamics (data -> matplotlib Figure, no I/O): the sink head's
attention-logit gap on BOS against log(step) with its fitted line, and BOS's value norm against step.

The data is a `sinkscope.training.dynamics.ReinforcementDynamics` (duck-typed here: viz sits below training).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

if TYPE_CHECKING:
    from sinkscope.training.dynamics import ReinforcementDynamics


def plot_reinforcement(d: ReinforcementDynamics) -> Figure:
    """Three panels: (1) ``gap`` and ``gap_lse`` against step on a log axis, the fit ``a + b ln(step)`` over its
    steps (a straight line there), the dormant onset marked; (2) BOS's ``||W_O^h v||`` over the median token's
    against step (linear axis); (3) the class's attention on BOS against step."""
    fig = Figure(figsize=(15, 4))
    ax_gap, ax_val, ax_att = fig.subplots(1, 3)
    pos = [(s, g, gl) for s, g, gl in zip(d.steps, d.gap, d.gap_lse) if s > 0]
    ax_gap.plot([p[0] for p in pos], [p[1] for p in pos], "o-", ms=3, label="BOS logit - mean other logit")
    ax_gap.plot([p[0] for p in pos], [p[2] for p in pos], "s-", ms=3, alpha=0.6,
                label="BOS logit - logsumexp other logits")
    f = d.fit
    xs = [s for s in d.steps if f.first_step <= s <= f.last_step]
    ax_gap.plot(xs, [f.intercept + f.slope * math.log(s) for s in xs], "k--",
                label=f"fit from step {f.first_step}: {f.slope:.2f} ln(step), R^2 {f.r2:.2f}")
    if d.onset_step:
        ax_gap.axvline(d.onset_step, color="grey", lw=0.8, ls=":")
    ax_gap.set_xscale("log")
    ax_gap.xaxis.set_minor_formatter(NullFormatter())
    ax_gap.set_title(f"L{d.layer}H{d.head} logit gap on BOS ({d.query_class} queries)")
    ax_gap.set_ylabel("logit (nats)")
    ax_gap.legend(fontsize=7)
    ax_val.plot(d.steps, d.value_out_norm, "o-", ms=3)
    ax_val.set_title(f"BOS ||W_O v|| / median token, L{d.layer}H{d.head}")
    ax_att.plot(d.steps, d.bos_attention, "o-", ms=3)
    ax_att.axhline(d.threshold, color="grey", lw=0.8, ls=":")
    ax_att.set_title(f"attention on BOS ({d.query_class} queries), L{d.layer}H{d.head}")
    ax_att.set_ylim(-0.05, 1.05)
    for ax in (ax_gap, ax_val, ax_att):
        ax.set_xlabel("step")
    fig.suptitle(f"{d.run}: mutual reinforcement (Guo et al.)" if d.run else "mutual reinforcement (Guo et al.)")
    fig.tight_layout()
    return fig
