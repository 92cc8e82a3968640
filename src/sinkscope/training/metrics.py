"""The row of ``metrics.jsonl``: a tinygpt's losses plus its sink profile on the evaluation batch.

:func:`measure_model` is `sinkscope.profile.profile_sinks` (Sink_0 from the weights used and from Gu et al.'s
row-normalised proxy, the sink slot's share, attention on the first token per head, the first token's value and
residual norms relative to the median other token) plus the losses and, per head, an active/dormant label per
input class. Every sink number comes from the definitions in `sinkscope.metrics.sink` (RESEARCH.md §1):
``alpha[l, h, k]`` = mean over the queries t that can see k of ``A[l, h, t, k]``; ``Sink_k^eps`` = share of
(l, h) with ``alpha[l, h, k] > eps``.

To log a new value, add a function ``(ctx: Measured) -> dict`` to `ROW_PARTS`.

**Mutual reinforcement over training.** Guo et al. (2410.13835, RESEARCH.md §5) analyse a simplified model of a
dormant head: the attention logit on BOS grows roughly logarithmically in the training step while BOS's value
state shrinks, each driving the other. Each row logs, per query class, layer and head, ``bos_logit_gap``
(:func:`bos_logit_gap`) and ``bos_value_out_norm`` (BOS's ``||W_O^h v||`` over the median other token's).
:func:`reinforcement_dynamics` reads a run's rows, picks one head (by default the one whose class queries put
the most attention on BOS at the end: the sink head), fits ``gap = a + b ln(step)`` by least squares over the
steps from the head's dormant onset (the first evaluation where that attention exceeds Guo et al.'s 0.89) on,
and reports the slope ``b``, its R^2, the R^2 of a straight line in the step, and the value norm's trend over
the same steps. ``sinkscope train reinforcement RUN --out DIR`` writes ``reinforcement.json`` and
``reinforcement.png``.

>>> fit = log_step_fit([100, 1000, 10000], [1.0, 3.0, 5.0])
>>> round(fit.slope * math.log(10), 6), round(fit.r2, 6)
(2.0, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sinkscope.collectors.tinygpt import Captured, capture_tinygpt
from sinkscope.errors import InputError
from sinkscope.hooks import forward_hooks
from sinkscope.io import ensure_output_dir, read_jsonl, save_figure_atomic, write_json_atomic
from sinkscope.metrics.sink import column_alpha, first_and_median_norm, first_norm_ratio, row_normalised
from sinkscope.metrics.sink import norm_ratio as norm_ratio
from sinkscope.metrics.sink import sink_ratio as sink_ratio
from sinkscope.models.attention import scaled_logits
from sinkscope.models.tinygpt import TinyGPT, attention_mask, rope
from sinkscope.profile import SinkProfile, profile_sinks
from sinkscope.tasks.batch import LMBatch

#: Guo et al.'s dormant criterion (their code): the head's non-trigger queries put > 0.89 of their attention on BOS
DORMANT_THRESHOLD = 0.89


@dataclass
class Measured:
    """What one evaluation measured: the batch, the model's logits and capture points, its profile, settings."""

    model: TinyGPT
    batch: LMBatch
    logits: Tensor  # (B, T, V)
    captured: Captured
    profile: SinkProfile
    eps: float
    dormant_threshold: float
    attn_logits: list[Tensor] | None = None  # per layer (B, H, Q, K): q.k / sqrt(d) on real keys; None: not defined


def _r4(x: np.ndarray) -> list[list[float]]:
    """Per layer, per head values rounded to 4 places (rows stay short)."""
    return [[round(v, 4) for v in row] for row in np.asarray(x, dtype=np.float64).tolist()]


def loss_keys(m: Measured) -> dict:
    """``loss`` (mean next-token NLL on the loss positions), ``loss_<part>`` per named part, ``excess_loss``
    (over the true model's NLL, when the task knows it)."""
    b = m.batch
    nll = F.cross_entropy(m.logits.flatten(0, 1), b.targets.flatten(), reduction="none").view_as(b.targets)
    mask = b.loss_mask
    row: dict = {"loss": float((nll * mask).sum() / mask.sum().clamp_min(1))}
    for name, part in b.parts.items():
        sel = part & mask
        row[f"loss_{name}"] = float((nll * sel).sum() / sel.sum().clamp_min(1))
    if b.oracle_nll is not None:
        row["excess_loss"] = row["loss"] - float((b.oracle_nll * mask).sum() / mask.sum().clamp_min(1))
    return row


def sink_keys(m: Measured) -> dict:
    """``sink_ratio`` / ``sink_ratio_proxy`` (Sink_0^eps), with a sink slot ``sink_ratio_slot(_proxy)`` and
    ``slot_attention``; per layer and head ``bos_attention(_proxy)`` (alpha_0 averaged over the sequences)."""
    p = m.profile
    row: dict = {"sink_ratio": p.sink_ratio(0, m.eps), "sink_ratio_proxy": p.sink_ratio(0, m.eps, proxy=True)}
    if p.sink_mass is not None:
        row["sink_ratio_slot"] = p.slot_sink_ratio(m.eps)
        row["sink_ratio_slot_proxy"] = p.slot_sink_ratio(m.eps, proxy=True)
        row["slot_attention"] = _r4(p.sink_mass.mean(0))
    row["bos_attention"] = _r4(p.alpha_mean(0))
    row["bos_attention_proxy"] = _r4(p.alpha_mean(0, proxy=True))
    return row


def norm_keys(m: Measured) -> dict:
    """Per layer, pooled over the batch (`first_norm_ratio`):

    - ``bos_value_norm``: the first token's raw value norm ``||v||`` (heads concatenated) over the median other
      token's;
    - ``bos_value_out_norm``: per head, Guo et al.'s value drain ``||W_O^h v_h||`` (the head's value after its
      slice of the output projection, what the head adds to the residual stream per unit of attention) of the
      first token over the median other token's;
    - ``bos_residual_norm``: the first token's residual norm over the median other token's (as Sink_0 papers
      plot it); ``bos_residual_norm_mean``: over the mean other token's (Gu et al.'s ratio);
    - ``bos_residual_abs``, ``median_residual_abs``: the two residual norms themselves (Guo et al. plot the
      absolute norm).
    """
    p = m.profile
    value = torch.from_numpy(np.sqrt((p.value_norm.astype(np.float64) ** 2).sum(2)))  # (N, L, T)
    resid = torch.from_numpy(p.residual_norm)  # (N, L, T)
    L = resid.shape[1]
    first_median = [first_and_median_norm(resid[:, l]) for l in range(L)]
    H, D = m.model.cfg.n_heads, m.model.cfg.d_head
    value_out = []
    for layer, v in enumerate(m.captured.values):  # v: (B, H, T, D), real keys only
        w_o = m.model.layers[layer].attn.proj.weight.detach().view(-1, H, D)  # (d_model, H, D)
        out = torch.einsum("bhtd,mhd->bhtm", v.float(), w_o.float()).norm(dim=-1)  # (B, H, T)
        value_out.append([round(first_norm_ratio(out[:, h]), 4) for h in range(H)])
    return {"bos_value_norm": [round(first_norm_ratio(value[:, l]), 4) for l in range(L)],
            "bos_value_out_norm": value_out,
            "bos_residual_norm": [round(first_norm_ratio(resid[:, l]), 4) for l in range(L)],
            "bos_residual_norm_mean": [round(float(resid[:, l, 0].mean() / resid[:, l, 1:].mean().clamp_min(1e-12)), 4)
                                       for l in range(L)],
            "bos_residual_abs": [round(f, 4) for f, _ in first_median],
            "median_residual_abs": [round(med, 4) for _, med in first_median]}


def head_labels(m: Measured) -> dict:
    """Per head and input class: the proxy attention the class's queries put on token 0 (plus the sink slot,
    where a dormant head parks its attention), ``head_bos_mass``, and ``dormant`` above the threshold
    (``train.dormant_threshold``, default 0.89: Guo et al.'s code calls a head dormant when its non-trigger
    queries put more than 0.89 of their attention on BOS; 0.5, this lab's earlier default, is an option)."""
    cfg, b, cap = m.model.cfg, m.batch, m.captured
    visible = attention_mask(b.idx.shape[1], window=cfg.window, prefix_len=b.prefix_len, device=b.idx.device)
    heads: dict[str, dict[str, str]] = {}
    head_mass: dict[str, dict[str, float]] = {}
    for layer, w in enumerate(cap.weights):  # w: (B, H, Q, K)
        slot = cap.slots[layer] if cap.slots else None  # (B, H, Q)
        wn, sn = row_normalised(w, slot)
        for cls, queries in b.classes.items():
            mass = column_alpha(wn, visible, queries)[:, 0]  # (H,)
            if slot is not None and sn is not None:  # the slot is visible to every query
                q = queries[:, None, :].to(w.dtype)
                mass = mass + (sn * q).sum(dim=(0, 2)) / q.sum().clamp_min(1)
            for h, v in enumerate(mass.tolist()):
                key = f"L{layer}H{h}"
                head_mass.setdefault(key, {})[cls] = round(v, 4)
                heads.setdefault(key, {})[cls] = "dormant" if v > m.dormant_threshold else "active"
    return {"heads": heads, "head_bos_mass": head_mass}


def bos_logit_gap(z: Tensor, visible: Tensor, queries: Tensor) -> tuple[Tensor, Tensor]:
    """The first key's (BOS's) attention-logit gap per head, averaged over the chosen queries.

    For a query ``t`` that sees key 0 and at least one other key ``k`` (``1 <= k``, visible), with
    pre-normalisation logits ``z[t, k] = q_t . k_k / sqrt(d)``:

    - ``gap[t] = z[t, 0] - mean_k z[t, k]``: Guo et al.'s attention logit on BOS in their simplified model of the
      mutual-reinforcement dynamics, where the logits on the other keys are held at zero and BOS's logit grows
      ~log(training step); subtracting the mean of the others makes it invariant to the per-row constant that
      softmax ignores.
    - ``gap_lse[t] = z[t, 0] - logsumexp_k z[t, k]``: for softmax the log-odds ``log(A[t, 0] / (1 - A[t, 0]))``
      of the attention on BOS (equal to ``gap[t] - log(t)`` when the other logits are all equal).

    Args:
        z: logits ``(B, H, Q, K)`` on real keys (key 0 is the first token).
        visible: ``(Q, K)`` bool, query t may attend key k.
        queries: ``(B, Q)`` bool, the queries averaged over (e.g. Bigram-Backcopy's non-trigger queries).
    Returns:
        ``(gap, gap_lse)``, each ``(H,)`` float64; NaN for a head when no query qualifies.
    """
    z = z.double()
    others = visible.clone()
    others[:, 0] = False
    n_other = others.sum(-1)  # (Q,)
    use = queries & (visible[:, 0] & (n_other > 0))[None, :]  # (B, Q)
    z0 = z[..., 0]  # (B, H, Q)
    mean_other = z.masked_fill(~others, 0.0).sum(-1) / n_other.clamp_min(1)
    lse_other = torch.logsumexp(z.masked_fill(~others, float("-inf")), dim=-1)
    u = use[:, None, :].expand_as(z0)
    n = u.sum(dim=(0, 2)).double()  # (H,)
    gap = torch.where(u, z0 - mean_other, 0.0).sum(dim=(0, 2)) / n
    gap_lse = torch.where(u, z0 - lse_other, 0.0).sum(dim=(0, 2)) / n
    return gap, gap_lse


def logit_keys(m: Measured) -> dict:
    """Per input class (as `head_labels`), per layer and head: ``bos_logit_gap`` and ``bos_logit_gap_lse``
    (:func:`bos_logit_gap`), the first token's attention-logit gap over the class's queries. Left out for models
    whose logits carry more than ``q.k / sqrt(d)`` (ALiBi) and for tasks without query classes."""
    if m.attn_logits is None or not m.batch.classes:
        return {}
    cfg, b = m.model.cfg, m.batch
    visible = attention_mask(b.idx.shape[1], window=cfg.window, prefix_len=b.prefix_len, device=b.idx.device)
    gap: dict[str, list[list[float]]] = {}
    gap_lse: dict[str, list[list[float]]] = {}
    for cls, queries in b.classes.items():
        per_layer = [bos_logit_gap(z, visible, queries) for z in m.attn_logits]
        gap[cls] = _r4(np.array([g.numpy() for g, _ in per_layer]))
        gap_lse[cls] = _r4(np.array([g.numpy() for _, g in per_layer]))
    return {"bos_logit_gap": gap, "bos_logit_gap_lse": gap_lse}


#: The parts of a metrics row, in order; each returns some of its keys.
ROW_PARTS: list[Callable[[Measured], dict]] = [loss_keys, sink_keys, norm_keys, head_labels, logit_keys]


def _logit_hooks(model: TinyGPT, seen: list[Tensor]) -> list:
    """Forward hooks that append each layer's attention logits on real keys, ``(B, H, T, T)``, to ``seen``."""
    cfg = model.cfg
    H, D, S = cfg.n_heads, cfg.d_head, cfg.n_sink_tokens

    def record(x: Tensor) -> None:
        B, TS = x.shape[0], x.shape[1]
        q, k, _ = x.detach().view(B, TS, 3, H, D).permute(2, 0, 3, 1, 4)  # (B, H, S + T, D), as the layer
        if cfg.positions == "rope":
            q, k = rope(q, cfg.rope_theta), rope(k, cfg.rope_theta)
        seen.append(scaled_logits(q[:, :, S:], k[:, :, S:], None))

    return [(block.attn.qkv, record, False) for block in model.layers]


@torch.no_grad()
def measure_model(model: nn.Module, batch: LMBatch, *, eps: float = 0.3,
                  dormant_threshold: float = DORMANT_THRESHOLD) -> dict:
    """One evaluation row (see module docstring). ``model`` is a :class:`TinyGPT` (unwrapped)."""
    if not isinstance(model, TinyGPT):
        raise TypeError(f"measure_model takes a TinyGPT, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    attn_logits: list[Tensor] = []
    try:
        with capture_tinygpt(model) as cap, forward_hooks(_logit_hooks(model, attn_logits)):
            logits = model(batch.idx, prefix_len=batch.prefix_len)
        prof = profile_sinks(model, batch.idx.tolist(), eps=eps, batch_size=max(len(batch.idx), 1),
                             prefix_len=batch.prefix_len)
    finally:
        model.train(was_training)
    m = Measured(model, batch, logits, cap, prof, eps, dormant_threshold,
                 None if model.cfg.positions == "alibi" else attn_logits)
    row: dict = {}
    for part in ROW_PARTS:
        row.update(part(m))
    return row


# ---------------------------------------------------------------- mutual reinforcement over training


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
        from sinkscope.viz.training import plot_reinforcement

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
