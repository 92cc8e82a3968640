"""Figures of training runs (data -> matplotlib Figure, no I/O): one run's dynamics and comparisons of runs, and
Guo et al.'s mutual reinforcement (`plot_reinforcement`: a `sinkscope.training.metrics.ReinforcementDynamics`).

Both read the rows of a run's ``metrics.jsonl`` (`sinkscope.training.metrics`), one dict per evaluation step.
A comparison figure is data, not code: a `ComparisonFigure` names the runs and its `Panel` s, and is built
from a mapping (a YAML file such as ``experiments/figures.yaml``) by `ComparisonFigure.from_dict`.

>>> spec = ComparisonFigure.from_dict("demo", {"runs": ["a", "b"], "panels": [
...     {"title": "eval loss", "key": "loss", "log": True},
...     {"title": "BOS / median residual, layer 1", "key": "bos_residual_norm", "layer": 1}]})
>>> rows = [{"step": 0, "loss": 4.0, "bos_residual_norm": [1.0, 1.5]},
...         {"step": 50, "loss": 2.0, "bos_residual_norm": [1.2, 2.5]}]
>>> [p.value(rows[1]) for p in spec.panels]
[2.0, 2.5]
>>> fig = plot_comparison(spec, {"a": rows})
>>> len(fig.axes)
2
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter

from sinkscope.errors import InputError

if TYPE_CHECKING:
    from sinkscope.training.metrics import ReinforcementDynamics

Row = dict[str, Any]

#: how a panel reads one number from a metrics row (see `Panel`)
READS = ("value", "layer", "max_head", "head_mass")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def plot_dynamics(rows: Sequence[Row], title: str = "", eps: float | None = None) -> Figure:
    """One run over training steps, five panels: losses, Sink_0, mean attention on the first token, its value
    norm and its residual norm over the median token's (one line per layer, heads averaged).

    Args:
        rows: ``metrics.jsonl`` rows (``step``, ``loss``, ``sink_ratio``, ``bos_attention`` ``(L, H)``,
            ``bos_value_norm`` ``(L,)``, ``bos_residual_norm`` ``(L,)``; optional ``loss_copy``,
            ``loss_bigram``, ``excess_loss``, ``sink_ratio_proxy``, ``sink_ratio_slot``).
        title: the figure's title (the run's name).
        eps: the sink threshold the run measured with (``train.eps``), shown in the sink panel's title.
    """
    steps = [r["step"] for r in rows]
    fig = Figure(figsize=(22, 4))
    axes = fig.subplots(1, 5)
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
        for layer in range(len(rows[-1][key])):
            vals = [r[key][layer] for r in rows]
            if isinstance(vals[0], list):
                vals = [_mean(v) for v in vals]
            ax.plot(steps, vals, label=f"layer {layer}")
        ax.set_title(label)
        ax.legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class Panel:
    """One panel of a comparison figure: one number per metrics row, one line per run.

    Attributes:
        title: the panel's title.
        key: the metrics-row key to read.
        read: ``value`` (``row[key]``), ``layer`` (``row[key][layer]``, heads averaged when per head),
            ``max_head`` (the largest value of a per-layer, per-head metric) or ``head_mass``
            (``row[key][head][cls]``, e.g. ``head_bos_mass`` of ``L1H0`` for ``non_trigger`` queries).
        layer / head / cls: what ``layer`` and ``head_mass`` read.
        log: a log y axis.
    """

    title: str
    key: str
    read: str = "value"
    layer: int | None = None
    head: str | None = None
    cls: str | None = None
    log: bool = False

    def value(self, row: Row) -> float | None:
        """This panel's number in ``row`` (None where the row lacks it)."""
        v = row.get(self.key)
        if v is None:
            return None
        if self.read == "layer":
            if self.layer is None or len(v) <= self.layer:
                return None
            v = v[self.layer]
            return _mean(v) if isinstance(v, list) else v
        if self.read == "max_head":
            return max(max(per_layer) for per_layer in v)
        if self.read == "head_mass":
            return v.get(self.head, {}).get(self.cls)
        return v


@dataclass(frozen=True)
class ComparisonFigure:
    """A figure comparing runs: the run names (experiment names, ``RUNS/NAME``), the panels and the x key."""

    name: str
    runs: tuple[str, ...]
    panels: tuple[Panel, ...]
    x: str = "step"

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any]) -> ComparisonFigure:
        """Build from ``{"runs": [...], "panels": [{"title", "key", "layer" | "head"+"class" | "max_head": true,
        "log"}...], "x": "step"}``; a panel with ``layer`` reads that layer, one with ``head`` and ``class`` a
        head's mass, one with ``max_head: true`` the largest head. Raises InputError naming the bad entry."""
        if not isinstance(d, Mapping) or not d.get("runs") or not d.get("panels"):
            raise InputError(f"figure {name!r}: expected a mapping with 'runs' and 'panels' lists")
        panels = []
        for i, p in enumerate(d["panels"]):
            where = f"figure {name!r} panel {i + 1}"
            if not isinstance(p, Mapping) or not isinstance(p.get("title"), str) or not isinstance(p.get("key"), str):
                raise InputError(f"{where}: expected a mapping with 'title' and 'key'")
            unknown = set(p) - {"title", "key", "layer", "head", "class", "max_head", "log"}
            if unknown:
                raise InputError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
            if "layer" in p:
                read = "layer"
            elif "head" in p or "class" in p:
                read = "head_mass"
                if not ("head" in p and "class" in p):
                    raise InputError(f"{where}: a head's mass needs both 'head' and 'class'")
            else:
                read = "max_head" if p.get("max_head") else "value"
            panels.append(Panel(p["title"], p["key"], read, p.get("layer"), p.get("head"), p.get("class"),
                                bool(p.get("log", False))))
        return cls(name, tuple(str(r) for r in d["runs"]), tuple(panels), str(d.get("x", "step")))


def plot_comparison(spec: ComparisonFigure, runs: Mapping[str, Sequence[Row]], title: str = "") -> Figure:
    """One comparison figure: a row of panels, one line per run in every panel (same colour per run).

    Args:
        spec: what to draw.
        runs: run name -> its metrics rows (runs of ``spec`` that are missing are simply left out).
        title: the figure's title.
    """
    n = len(spec.panels)
    fig = Figure(figsize=(3.6 * n, 3.2))
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, panel in zip(axes, spec.panels):
        for i, (name, rows) in enumerate(runs.items()):
            pts = [(r[spec.x], panel.value(r)) for r in rows]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.plot(*zip(*pts), label=name, lw=1.2, color=f"C{i}")
        ax.set_title(panel.title, fontsize=9)
        ax.set_xlabel(spec.x, fontsize=8)
        ax.tick_params(labelsize=7)
        if panel.log:
            ax.set_yscale("log")
    handles = [Line2D([], [], color=f"C{i}", label=name) for i, name in enumerate(runs)]
    axes[0].legend(handles=handles, fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


Series = tuple[Sequence[float], Sequence[float]]


def plot_sink_positions(over_steps: Mapping[str, Series], by_position: Mapping[str, Sequence[float]],
                        sink_by_position: Mapping[str, Sequence[float]], *, eps: float = 0.3, marks: Sequence[int] = (),
                        title: str = "") -> Figure:
    """Where the sink is (Gu et al.'s Table 10), three panels:

    Args:
        over_steps: label -> ``(steps, values)``: e.g. the strongest head's alpha_0 (or alpha_j) over training.
        by_position: label -> ``(T,)`` the strongest head's mean alpha_k at every key position ``k``.
        sink_by_position: label -> ``(T,)`` Sink_k^eps at every key position.
        eps: the sink threshold (a dotted line in the first two panels).
        marks: key positions to mark with vertical lines (0 and the fixed token's j).
        title: the figure's title.
    """
    fig = Figure(figsize=(15, 3.6))
    axes = fig.subplots(1, 3)
    ax = axes[0]
    for i, (label, (x, y)) in enumerate(over_steps.items()):
        ax.plot(x, y, label=label, lw=1.2, color=f"C{i}", marker="." if len(x) < 30 else None)
    ax.axhline(eps, ls=":", color="grey", lw=1)
    ax.set_xlabel("step", fontsize=8)
    ax.set_title("strongest head's alpha over training", fontsize=9)
    for ax, data, name in ((axes[1], by_position, "strongest head's alpha_k"),
                           (axes[2], sink_by_position, f"Sink_k (eps {eps:g})")):
        for i, (label, y) in enumerate(data.items()):
            ax.plot(range(len(y)), y, label=label, lw=1.2, color=f"C{i}")
        for k in marks:
            ax.axvline(k, ls="--", color="grey", lw=0.8)
        ax.set_xlabel("key position k", fontsize=8)
        ax.set_title(f"{name} by key position", fontsize=9)
    axes[1].axhline(eps, ls=":", color="grey", lw=1)
    for ax in axes:
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


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
