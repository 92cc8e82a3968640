"""The KV heads section of `sinkscope report`: a per-head KV policy calibrated on the reported model
(`sinkscope.kv.calibrate.calibrate`), its layer x kv-head map, and its measured budget/quality line.

One profiling pass: ``calibrate`` ranks the kv heads at ``ReportOptions.kv_length`` tokens with the default budget
(`REPORT_BUDGET`) and measures that policy's held-out KL; the other budgets of the line (`BUDGETS`) are re-cut
from the same head scores with `KVPolicy.from_scores` (same sinks, window and ranking criterion, so each is the
policy ``calibrate`` would return at that budget with that window) and their KL is measured on the same held-out
pieces with the same measurement calibrate uses. The budget is a fraction of the dense cache's bytes at
``kv_length`` tokens; at that length the window's floor ``(n_sink + window) / kv_length`` is the cheapest policy
(every head streaming).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sinkscope.kv.calibrate import DEFAULT_BUDGET, DEFAULT_SINKS, HeldOutKL, calibrate, default_window
from sinkscope.kv.calibration_data import calibration_sets
from sinkscope.kv.mass import first_counted_query
from sinkscope.kv.policy import SCORE_COLUMNS, KVPolicy
from sinkscope.report import explain
from sinkscope.report.html import Section

#: the budget of the map (the default of ``sinkscope kv calibrate``)
REPORT_BUDGET = DEFAULT_BUDGET
#: the budgets of the quality line (fractions of the dense cache's bytes at the calibration length)
BUDGETS: tuple[float, ...] = (0.125, 0.25, 0.5)


def kv_policies(model: Any, tokenizer: Any, length: int, *, texts: list[str] | None = None,
                budgets: tuple[float, ...] = BUDGETS, progress: Any = None) -> dict[str, Any]:
    """Calibrate at ``REPORT_BUDGET`` (window `default_window` of it) and re-cut the same scores at ``budgets``.

    Returns ``{"result": CalibrationResult, "policies": {budget: KVPolicy with measured_kl}, "n_sink",
    "window"}``; the ``REPORT_BUDGET`` policy is calibrate's own (its ``measured_kl`` is calibrate's). Budgets below
    the streaming floor are left out.
    """
    n_sink, window = DEFAULT_SINKS, default_window(REPORT_BUDGET, DEFAULT_SINKS, length)
    floor = (n_sink + window) / length
    others = [b for b in budgets if b != REPORT_BUDGET and b >= floor - 1e-9]
    seen = [0]  # calibrate's step count; the re-cut budgets' KL (and the dense pass they share) follow it

    def cal_progress(done: int, total: int | None, what: str = "") -> None:
        seen[0] = total or done
        if progress is not None:
            progress(done, seen[0] + len(others) + 1, what)

    res = calibrate(model, tokenizer, texts=texts, target_length=length, n_sink=n_sink, window=window,
                    budget=REPORT_BUDGET, measure_kl=True, progress=cal_progress)
    base = res.policy
    scores = base.scores_array()
    criterion = base.info.get("criterion_column")
    policies: dict[float, KVPolicy] = {}
    total = seen[0] + len(others) + 1
    if others:
        sets = calibration_sets(tokenizer, length, texts=texts)
        kl = HeldOutKL(model, sets.held_out, first_counted_query(n_sink, window))
        if progress is not None:
            progress(seen[0] + 1, total, "dense held-out pass")
        for i, b in enumerate(others):
            p = KVPolicy.from_scores(scores, b, n_sink, window, length, model=base.model, criterion=criterion,
                                     calibration_sha256=base.calibration_sha256)
            policies[b] = p.with_fields(measured_kl=kl(p))
            if progress is not None:
                progress(seen[0] + 2 + i, total, f"KL at budget {b:g}")
    elif progress is not None:
        progress(total, total, "")
    policies[REPORT_BUDGET] = base
    return {"result": res, "policies": dict(sorted(policies.items())), "n_sink": n_sink, "window": window}


def kv_section(ctx: Any, sec: Section, progress: Any) -> None:
    """Calibrate, then the map (full vs streaming at `REPORT_BUDGET`, distant mass per head) and the line."""
    from sinkscope.viz import kv as kv_plots

    o = ctx.options
    length = o.kv_length
    got = kv_policies(ctx.model, ctx.tokenizer, length,
                      progress=lambda d, t, w="": progress(d, t, w))
    res, policies = got["result"], got["policies"]
    base = res.policy
    scores = base.scores_array()
    distant = scores[..., SCORE_COLUMNS.index("distant")]
    full = base.full_matrix()
    criterion = str(base.info.get("criterion_column", "distant"))
    rank = scores[..., SCORE_COLUMNS.index(criterion)] if criterion in SCORE_COLUMNS else distant
    n = base.n_full
    flat = np.arange(distant.size)
    top_distant = flat[np.lexsort((flat, -distant.ravel()))][:n]
    agree = int(full.ravel()[top_distant].sum())
    G = base.model.get("n_heads", 0) // max(1, base.n_kv_heads)
    share_full = float(distant[full].sum() / distant.sum()) if distant.sum() > 0 else float("nan")
    line = [{"budget": b, "bytes_fraction": p.bytes_fraction(length), "n_full": p.n_full, "kl": p.measured_kl,
             "source": "calibrate" if b == REPORT_BUDGET else "re-cut from the same scores"}
            for b, p in policies.items()]
    sec.data.update({
        "length": length, "n_sink": got["n_sink"], "window": got["window"], "budget": base.budget,
        "requested_budget": REPORT_BUDGET, "criterion": criterion, "n_full": n, "n_heads": base.n_heads_total,
        "n_layers": base.n_layers, "n_kv_heads": base.n_kv_heads, "group": G,
        "full_heads": [list(h) for h in base.full_heads], "distant": distant.tolist(),
        "measured_kl": base.measured_kl, "line": line, "full_share_of_distant": share_full,
        "full_in_top_distant": agree, "seconds": res.seconds, "cpu_seconds": res.cpu_seconds,
        "held_out": res.pieces.get("held_out", []), "ranking": res.pieces.get("ranking", []),
        "full_layers": sorted({int(l) for l in np.nonzero(full)[0]}),
        "distant_full_mean": float(distant[full].mean()) if n else None,
        "distant_streaming_mean": float(distant[~full].mean()) if n < distant.size else None,
    })
    sec.text(f"A per-head KV policy calibrated on this model (`sinkscope.kv.calibrate`, as `sinkscope kv calibrate "
             f"--length {length} --budget {REPORT_BUDGET}`): {len(res.pieces.get('ranking', []))} pieces of {length} "
             f"tokens of the shipped calibration mix rank the {base.n_heads_total} kv heads by {criterion}; the top "
             f"ones keep every token, the others keep {got['n_sink']} sinks + the last {got['window']} tokens. "
             f"Distant mass: the share of a kv head's attention (summed over its {G} query heads) on the keys a "
             "streaming head drops. KL: mean next-token KL(dense || policy) on "
             f"{len(res.pieces.get('held_out', []))} held-out pieces, exact per-head-masked forward. "
             f"Calibration took {res.seconds:.1f} s here ({res.cpu_seconds:.1f} s CPU).")
    sec.figure(kv_plots.kv_head_map(distant, full, budget=base.budget),
               f"Layer x kv head at budget {100 * REPORT_BUDGET:g}%: distant mass per head; outlined: full cache.")
    sec.figure(kv_plots.kv_budget_line([r["bytes_fraction"] for r in line], [r["kl"] for r in line],
                                       labels=[f"{r['n_full']} full" for r in line]),
               f"Measured held-out KL against stored KV bytes at {length} tokens (one profiling pass).")
    sec.table(line, caption="Budget / quality (KL in nats/token)", csv="kv_budget_line.csv", sortable=False)
    rows = [{"layer": l, "kv_head": h, "cache": "full" if full[l, h] else "streaming",
             **{c: float(scores[l, h, i]) for i, c in enumerate(SCORE_COLUMNS[:scores.shape[-1]])},
             "rank_score": float(rank[l, h])}
            for l in range(base.n_layers) for h in range(base.n_kv_heads)]
    sec.table(rows, caption="Per kv head (sortable)", csv="kv_heads.csv", max_rows=20)
    for p in explain.explain_kv(sec.data):
        sec.explain(p)
