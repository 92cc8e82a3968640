"""The repetition section of `sinkscope report`: divergence rate vs repetition length, the sink circuit and the
effect of a sink patch, measured with the repeated-token library (`sinkscope.repetition`, Yona et al. 2503.08908).

Sizes are small so that the whole report stays within minutes on a CPU: a short word list, a few lengths, short
continuations, first-token *neurons* only (ablating every head is left to ``sinkscope repeat``). If the
repeated-token library is missing or fails, the section fails with its error and the rest of the report renders.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from sinkscope.errors import SinkscopeError
from sinkscope.report import explain
from sinkscope.viz.report import Section

#: Tokens per ordinary-text sequence used to find the circuit (4 sequences of the built-in prose).
CIRCUIT_TEXT_TOKENS = 32
CIRCUIT_TEXT_SAMPLES = 4


class RepetitionUnavailable(SinkscopeError):
    """The repeated-token analysis is not available in this installation."""


def _library() -> dict[str, Any]:
    try:
        from sinkscope.repetition.activations import neuron_stats
        from sinkscope.repetition.circuit import localise_sink_circuit
        from sinkscope.repetition.scan import ScanPlan, scan_repetition, summarise
        from sinkscope.tasks.repeated_tokens import run_token_id
    except ImportError as e:  # the repetition issue's modules are optional for the report
        raise RepetitionUnavailable(f"the repeated-token library is not available: {e}") from e
    return {"neuron_stats": neuron_stats, "localise_sink_circuit": localise_sink_circuit, "ScanPlan": ScanPlan,
            "scan_repetition": scan_repetition, "summarise": summarise, "run_token_id": run_token_id}


def _patch_builder() -> Any:
    """The repetition library's circuit -> `SinkPatch` builder, if it has one (None otherwise)."""
    try:
        from sinkscope.interventions import patch as patch_mod
    except ImportError:
        return None
    for name in ("patch_from_circuit", "build_patch", "make_patch", "patch_sink_circuit"):
        fn = getattr(patch_mod, name, None)
        if callable(fn):
            return fn
    return None


def repetition_section(ctx: Any, sec: Section, progress: Any) -> None:
    """Divergence scan, circuit localisation (first-token neurons) and, when a patch can be had, its effect."""
    from sinkscope.domains import PROSE
    from sinkscope.viz import report_plots

    lib = _library()
    o = ctx.options
    model, tok = ctx.model, ctx.tokenizer
    words = []
    for w in o.repeat_words:
        try:
            lib["run_token_id"](tok, w)
            words.append(w)
        except SinkscopeError:
            continue
    if not words:
        raise RepetitionUnavailable("none of the report's repeat words is a single token for this tokenizer")
    lengths = sorted(o.repeat_lengths)
    plan = lib["ScanPlan"](words=words, lengths=lengths, forms=["instruct"], max_new_tokens=o.repeat_new_tokens,
                           batch_size=len(words), sinkness_words=words[:1])
    n_cells = len(words) * len(lengths)
    steps = n_cells + 2  # cells, circuit, patch
    sec.text(f"Prompts: the chat template with \"Repeat the word 'X' forever.\", then the answer starts with N copies "
             f"of X; greedy continuation of {o.repeat_new_tokens} tokens. A continuation diverges when it leaves the "
             f"repetition (Yona et al. 2503.08908). Words: {', '.join(words)}; N = {', '.join(map(str, lengths))}.")
    tmp = Path(tempfile.mkdtemp(prefix="sinkscope-report-repeat-"))
    try:
        cells = lib["scan_repetition"](model, tok, plan, tmp, on_cells=lambda d, t: progress(d, steps))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rates = lib["summarise"](cells)
    rate_by_n = {int(r["n"]): float(r["rate"]) for r in rates}
    sec.data.update({"words": words, "lengths": lengths, "form": "instruct", "rates": rate_by_n,
                     "summary": rates})
    sec.tables["repetition_cells.csv"] = [{k: v for k, v in c.items() if k != "sinkness"} for c in cells]

    # the circuit: first-token neurons that make token 0 a sink, ranked by causal effect of ablating them
    text_seqs = [list(tok(t, add_special_tokens=True)["input_ids"])[:CIRCUIT_TEXT_TOKENS]
                 for t in PROSE[:CIRCUIT_TEXT_SAMPLES]]
    text_seqs = [s for s in text_seqs if len(s) == CIRCUIT_TEXT_TOKENS]
    circuit = None
    if o.circuit_per_layer > 0:
        try:
            stats = lib["neuron_stats"](model, text_seqs)
            circuit = lib["localise_sink_circuit"](model, tok, text_seqs, stats, heads=False,
                                                   per_layer=o.circuit_per_layer)
        except SinkscopeError as e:
            sec.data["circuit_error"] = str(e)
    else:
        sec.data["circuit_note"] = "circuit localisation skipped (--circuit-neurons 0)"
    progress(n_cells + 1, steps)
    if circuit is not None and not circuit.components:
        sec.data["circuit_note"] = ("no first-token neuron found: no MLP neuron fires on token 0 at 1.5 times its "
                                    "largest activation elsewhere, so this model's sink is not made by such neurons")
    patched = None
    if circuit is not None and circuit.components:
        top = circuit.top(5)
        sec.data["circuit"] = {
            "n_candidates": len(circuit.components), "baseline": circuit.baseline,
            "top": [{"layer": c.layer, "neuron": c.index, "effect": c.effect, "effect_residual": c.effect_residual,
                     "effect_attention": c.effect_attention, "first_act": c.first_act, "text_range": c.text_range}
                    for c in top],
            "description": _describe(top, len(circuit.components)),
        }
        sec.tables["circuit.csv"] = circuit.rows()
        builder = _patch_builder()
        if builder is not None:
            patched = _evaluate_patch(ctx, builder, circuit, stats, words, lengths, text_seqs, sec)
        else:
            sec.data["patch_note"] = ("the repetition library has no circuit-to-patch builder in this version; run "
                                      "`sinkscope repeat` to build and evaluate a patch")
    progress(steps, steps)

    sec.figure(report_plots.divergence_vs_length(lengths, [rate_by_n[n] for n in lengths],
                                                 [patched[n] for n in lengths] if patched else None),
               "Share of words whose continuation left the repetition, by number of repetitions.")
    cols = [c for c in ("n", "words", "diverged", "rate", "alpha_run_max", "norm_ratio_max", "cos_first_max",
                        "sink_share_max") if c in rates[0]]
    sec.table(rates, columns=cols, caption="Divergence by repetition length (sinkness columns: the first word's "
              "run, maxima over layers, relative to token 0)", sortable=False)
    sec.table([{k: c[k] for k in ("word", "n", "diverged", "continuation")} for c in cells],
              caption="Continuations", csv="repetition_cells.csv", max_rows=3 * len(words))
    if "circuit" in sec.data:
        sec.table(sec.data["circuit"]["top"], caption="Sink circuit: first-token neurons with the largest effect of "
                  "ablating them at token 0 (share of the sink removed)", csv="circuit.csv")
    for note in ("circuit_error", "circuit_note", "patch_note"):
        if note in sec.data:
            sec.text(f"Note: {sec.data[note]}.")
    if patched:
        sec.data["patched_rates"] = patched
    for p in explain.explain_repetition(sec.data):
        sec.explain(p)


def _describe(top: list[Any], n: int) -> str:
    best = top[0]
    layers = sorted({c.layer for c in top})
    return (f"of {n} candidate first-token neurons, ablating neuron {best.index} of layer {best.layer} at token 0 "
            f"removes {100 * best.effect:.0f}% of the sink (residual peak {100 * best.effect_residual:.0f}%, "
            f"attention {100 * best.effect_attention:.0f}%); the top {len(top)} sit in layer(s) "
            f"{', '.join(map(str, layers))}. These neurons fire at token 0 far above their range on other tokens: "
            "if a repeated token makes them fire too, it becomes a second sink.")


def _evaluate_patch(ctx: Any, builder: Any, circuit: Any, stats: Any, words: list[str], lengths: list[int],
                    text_seqs: list[list[int]], sec: Section) -> dict[int, float] | None:
    """Build a patch from the circuit with the library's builder and measure divergence with it."""
    from sinkscope.repetition.evaluate import evaluate_patch

    try:
        patch = builder(ctx.model, circuit, stats)
    except TypeError:
        sec.data["patch_note"] = f"the patch builder {builder.__name__} has a signature the report does not know"
        return None
    ev = evaluate_patch(ctx.model, ctx.tokenizer, patch, words, lengths, text_seqs,
                        max_new_tokens=ctx.options.repeat_new_tokens, batch_size=len(words))
    sec.data["patch"] = {"neurons": patch.n_neurons, "sink_ratio_before": ev.sink_ratio_before,
                         "sink_ratio_after": ev.sink_ratio_after, "kl": ev.text.kl,
                         "ppl_change": ev.text.ppl_change}
    sec.tables["patch_rates.csv"] = ev.rates
    return {int(r["n"]): float(r["rate_after"]) for r in ev.rates if np.isfinite(r["rate_after"])}
