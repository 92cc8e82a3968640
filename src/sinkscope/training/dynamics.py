"""Guo et al.'s mutual-reinforcement dynamics read off a run's ``metrics.jsonl``: the sink head's attention-logit
gap on BOS against log(step), and BOS's value norm against step.

Guo et al. (2410.13835, RESEARCH.md §5) analyse a simplified model of a dormant head: the attention logit on BOS
grows roughly logarithmically in the training step while BOS's value state shrinks, each driving the other. The
metrics row logs, per query class, layer and head, ``bos_logit_gap`` (BOS's logit minus the mean logit on the
other visible keys, averaged over the class's queries; `sinkscope.training.metrics.bos_logit_gap`) and
``bos_value_out_norm`` (BOS's ``||W_O^h v||`` over the median other token's). :func:`reinforcement_dynamics`
picks one head (by default the one whose class queries put the most attention on BOS at the end: the sink
head), fits ``gap = a + b ln(step)`` by least squares over the steps from the head's dormant onset (the first
evaluation where that attention exceeds Guo et al.'s 0.89) on, and reports the slope ``b``, its R^2 and the
value norm's trend over the same steps.

``sinkscope train reinforcement RUN --out DIR`` writes ``reinforcement.json`` and ``reinforcement.png``.

>>> fit = log_step_fit([100, 1000, 10000], [1.0, 3.0, 5.0])
>>> round(fit.slope * math.log(10), 6), round(fit.r2, 6)
(2.0, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sinkscope.errors import InputError
from sinkscope.io import ensure_output_dir, read_jsonl, save_figure_atomic, write_json_atomic
from sinkscope.training.metrics import DORMANT_THRESHOLD


@dataclass(frozen=True)
class LogStepFit:
    """Least-squares fit ``y = intercept + slope * ln(step)``: ``slope`` per e-fold of steps (times ln 10 =
    2.303 per decade), ``r2`` its coefficient of determination, over ``n`` points from ``first_step`` to
    ``last_step``."""

    slope: float
    intercept: float
    r2: float
    n: int
    first_step: int
    last_step: int

    @property
    def slope_per_decade(self) -> float:
        return self.slope * math.log(10.0)


def _r2(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares line ``y = intercept + slope * x``: ``(slope, intercept, R^2)``."""
    slope, intercept = np.polyfit(x, y, 1)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    ss_res = float(((y - (intercept + slope * x)) ** 2).sum())
    return float(slope), float(intercept), (1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"))


def linear_step_r2(steps: Sequence[int], values: Sequence[float]) -> float:
    """R^2 of a straight line in the step itself (the alternative to a log-step fit), finite values only."""
    s, y = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    keep = np.isfinite(y)
    return _r2(s[keep], y[keep])[2] if keep.sum() >= 3 else float("nan")


def log_step_fit(steps: Sequence[int], values: Sequence[float]) -> LogStepFit:
    """Fit ``values = a + b ln(steps)`` (steps > 0, at least 3 points; InputError otherwise)."""
    s = np.asarray(steps, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    keep = (s > 0) & np.isfinite(y)
    s, y = s[keep], y[keep]
    if len(s) < 3:
        raise InputError(f"a log-step fit needs at least 3 steps > 0 with finite values, got {len(s)}")
    slope, intercept, r2 = _r2(np.log(s), y)
    return LogStepFit(slope, intercept, r2, int(len(s)), int(s[0]), int(s[-1]))


@dataclass
class ReinforcementDynamics:
    """One head's logit gap and BOS value norm over training, with the log-step fit of the gap.

    Attributes:
        run, layer, head, query_class: the run directory's name, the head and the queries averaged over.
        steps: evaluation steps; ``gap``, ``gap_lse`` (nats of logit), ``bos_attention`` (the class's proxy
            attention on BOS), ``value_out_norm`` (BOS's ``||W_O^h v||`` / median token's) per step.
        onset_step: the first step whose ``bos_attention`` exceeds ``threshold`` (None: never dormant).
        fit: the gap against ln(step) from ``onset_step`` (or the first step > 0) on; ``fit_all``: over every
            step > 0; ``linear_r2`` / ``linear_r2_all``: R^2 of a straight line in the step over the same steps (the
            alternative to a log-step growth).
        value_start, value_end: ``value_out_norm`` at the fit's first and last step.
    """

    run: str
    layer: int
    head: int
    query_class: str
    threshold: float
    steps: list[int]
    gap: list[float]
    gap_lse: list[float]
    bos_attention: list[float]
    value_out_norm: list[float]
    onset_step: int | None
    fit: LogStepFit
    fit_all: LogStepFit
    linear_r2: float
    linear_r2_all: float
    value_start: float
    value_end: float

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["fit"]["slope_per_decade"] = self.fit.slope_per_decade
        d["fit_all"]["slope_per_decade"] = self.fit_all.slope_per_decade
        return d

    def save(self, out: str | Path) -> list[Path]:
        """Write ``reinforcement.json`` and ``reinforcement.png`` into ``out``; returns their paths."""
        from sinkscope.viz.reinforcement import plot_reinforcement

        d = ensure_output_dir(out)
        paths = [d / "reinforcement.json", d / "reinforcement.png"]
        write_json_atomic(paths[0], self.to_json())
        save_figure_atomic(paths[1], plot_reinforcement(self))
        return paths


def _series(rows: list[dict[str, Any]], key: str, cls: str, layer: int, head: int) -> list[float]:
    out = []
    for r in rows:
        v = r.get(key)
        if isinstance(v, dict):
            v = v.get(cls)
        out.append(float(v[layer][head]) if v is not None else float("nan"))
    return out


def reinforcement_dynamics(rows: list[dict[str, Any]], *, run: str = "", layer: int | None = None,
                           head: int | None = None, query_class: str = "non_trigger",
                           threshold: float = DORMANT_THRESHOLD, from_step: int | None = None
                           ) -> ReinforcementDynamics:
    """The dynamics of one head from a run's metrics rows (see module docstring).

    Args:
        rows: ``metrics.jsonl`` rows, one per evaluation (they must carry ``bos_logit_gap``).
        layer, head: the head; None picks the one with the largest final ``head_bos_mass`` of ``query_class``.
        query_class: the queries (Bigram-Backcopy: ``non_trigger``, where a dormant head sinks).
        threshold: attention on BOS that makes the head dormant (Guo et al.'s 0.89); the fit starts there.
        from_step: start the fit here instead of at the dormant onset.
    Raises:
        InputError: no row logs the gap for that class, or the head does not exist (one line).
    """
    rows = sorted((r for r in rows if "bos_logit_gap" in r), key=lambda r: r["step"])
    if not rows:
        raise InputError(f"run {run or '?'}: no metrics row logs bos_logit_gap (trained before it was added?)")
    if query_class not in rows[-1]["bos_logit_gap"]:
        raise InputError(f"run {run or '?'}: no query class {query_class!r}; the rows have "
                         f"{', '.join(rows[-1]['bos_logit_gap'])}")
    final_gap = rows[-1]["bos_logit_gap"][query_class]
    n_layers, n_heads = len(final_gap), len(final_gap[0])
    mass = rows[-1].get("head_bos_mass", {})
    if layer is None or head is None:
        cands = [(mass.get(f"L{l}H{h}", {}).get(query_class, float("-inf")), l, h)
                 for l in range(n_layers) for h in range(n_heads)
                 if (layer is None or l == layer) and (head is None or h == head)]
        if not cands:
            raise InputError(f"layer {layer} is outside the run's {n_layers} layers")
        _, layer, head = max(cands)
    if not (0 <= layer < n_layers and 0 <= head < n_heads):
        raise InputError(f"head L{layer}H{head} is outside the run's {n_layers} layers x {n_heads} heads")
    steps = [int(r["step"]) for r in rows]
    gap = _series(rows, "bos_logit_gap", query_class, layer, head)
    gap_lse = _series(rows, "bos_logit_gap_lse", query_class, layer, head)
    attn = [float(r.get("head_bos_mass", {}).get(f"L{layer}H{head}", {}).get(query_class, float("nan")))
            for r in rows]
    value = [float(r["bos_value_out_norm"][layer][head]) if "bos_value_out_norm" in r else float("nan")
             for r in rows]
    onset = next((s for s, a in zip(steps, attn) if a > threshold), None)
    start = from_step if from_step is not None else (onset if onset is not None else 1)
    sel = [i for i, s in enumerate(steps) if s >= max(start, 1)]
    fit = log_step_fit([steps[i] for i in sel], [gap[i] for i in sel])
    fit_all = log_step_fit(steps, gap)
    linear = linear_step_r2([steps[i] for i in sel], [gap[i] for i in sel])
    return ReinforcementDynamics(run, layer, head, query_class, threshold, steps, gap, gap_lse, attn, value,
                                 onset, fit, fit_all, linear, linear_step_r2([s for s in steps if s > 0],
                                                                             [g for s, g in zip(steps, gap) if s > 0]),
                                 value[sel[0]], value[sel[-1]])


def run_reinforcement(run_dir: str | Path, **kwargs: Any) -> ReinforcementDynamics:
    """:func:`reinforcement_dynamics` of a run directory's ``metrics.jsonl``."""
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    if not rows:
        raise InputError(f"{run_dir} has no metrics.jsonl rows")
    return reinforcement_dynamics(rows, run=run_dir.name, **kwargs)
