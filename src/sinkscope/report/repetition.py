"""The repetition section of `sinkscope report`: divergence rate vs repetition length, the sink circuit, and the
shipped default patch (``dedup`` of `sinkscope.repetition.patch_methods.PATCH_METHODS`, what ``sinkscope repeat
patch`` writes): whether it stops the divergence, and its harm measured where it acts, on the shipped
natural-repetition documents (`sinkscope.repetition.harm`, the EVAL set), measured with the repeated-token library
(`sinkscope.repetition`, Yona et al. 2503.08908).

Sizes are small so that the whole report stays within minutes on a CPU: a short word list, a few lengths, short
continuations, first-token *neurons* only (ablating every head is left to ``sinkscope repeat``), a few harm
documents (those where the patch's gate opens, `harm_where_it_acts`). If the analysis fails, the section fails
with its error and the rest of the report renders.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from sinkscope.errors import SinkscopeError
from sinkscope.repetition.activations import neuron_stats
from sinkscope.repetition.circuit import localise_sink_circuit
from sinkscope.repetition.grid import NO_PATCH, GridPlan, run_grid, summarise_cells
from sinkscope.repetition.harm import (
    effects_to_json,
    encode_doc,
    gate_closed_everywhere,
    harm_effects,
    load_harm_set,
    summarise_harm,
)
from sinkscope.repetition.patch_methods import build_patch, patch_method
from sinkscope.repetition.words import run_token_id
from sinkscope.report import explain
from sinkscope.report.html import Section

#: Tokens per ordinary-text sequence used to find the circuit (4 sequences of the built-in prose).
CIRCUIT_TEXT_TOKENS = 32
CIRCUIT_TEXT_SAMPLES = 4
#: Words (and run length: the second longest of the report's lengths) used to see which circuit neurons fire on
#: repeated tokens.
CIRCUIT_RUN_WORDS = 2
#: the patch the section evaluates: the shipped default of ``sinkscope repeat patch`` (docs/repetition.md)
DEFAULT_PATCH_METHOD = "dedup"
#: where its harm is measured: the EVAL natural-repetition documents (package data ``data/harm/eval``), never used
#: to design the patch; WikiText cannot show its harm (its gate never opens on ordinary prose)
HARM_SET = "eval"


class RepetitionUnavailable(SinkscopeError):
    """The repeated-token analysis cannot run on this model (e.g. no report word is a single token)."""


def repetition_section(ctx: Any, sec: Section, progress: Any) -> None:
    """Divergence scan, circuit localisation (first-token neurons) and, when a patch can be had, its effect."""
    from sinkscope.domains import PROSE
    from sinkscope.viz import report_plots

    o = ctx.options
    model, tok = ctx.model, ctx.tokenizer
    words = []
    for w in o.repeat_words:
        try:
            run_token_id(tok, w)
            words.append(w)
        except SinkscopeError:
            continue
    if not words:
        raise RepetitionUnavailable("none of the report's repeat words is a single token for this tokenizer")
    lengths = sorted(o.repeat_lengths)
    plan = GridPlan(words=words, forms=["instruct"], lengths=lengths, max_new_tokens=o.repeat_new_tokens,
                    batch_size=len(words), sinkness_words=words[:1])
    n_cells = len(words) * len(lengths)
    steps = n_cells + 2  # cells, circuit, patch
    sec.text(f"Prompts: the chat template with \"Repeat the word 'X' forever.\", then the answer starts with N copies "
             f"of X; greedy continuation of {o.repeat_new_tokens} tokens. A continuation diverges when it leaves the "
             f"repetition (Yona et al. 2503.08908). Words: {', '.join(words)}; N = {', '.join(map(str, lengths))}.")
    tmp = Path(tempfile.mkdtemp(prefix="sinkscope-report-repeat-"))
    try:
        cells = run_grid(model, tok, plan, {NO_PATCH: None}, tmp, progress=lambda d, t, what="": progress(d, steps)
                         ).cells
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rates = summarise_cells(cells)
    rate_by_n = {int(r["n"]): float(r["rate"]) for r in rates}
    sec.data.update({"words": words, "lengths": lengths, "form": "instruct", "rates": rate_by_n,
                     "summary": rates})
    sec.tables["repetition_cells.csv"] = [{k: v for k, v in c.items() if k != "sinkness"} for c in cells]

    # the circuit: first-token neurons that make token 0 a sink, ranked by causal effect of ablating them
    text_seqs = [list(tok(t, add_special_tokens=True)["input_ids"])[:CIRCUIT_TEXT_TOKENS]
                 for t in PROSE[:CIRCUIT_TEXT_SAMPLES]]
    text_seqs = [s for s in text_seqs if len(s) == CIRCUIT_TEXT_TOKENS]
    circuit, stats = None, None
    n_max = lengths[-1]
    n_runs = lengths[-2] if len(lengths) > 1 else n_max
    if o.circuit_per_layer > 0:
        try:
            stats = neuron_stats(model, text_seqs)
            circuit = localise_sink_circuit(
                model, tok, text_seqs, stats, heads=False, per_layer=o.circuit_per_layer,
                run_words=words[:CIRCUIT_RUN_WORDS], run_length=n_runs, max_new_tokens=o.repeat_new_tokens,
                batch_size=len(words))
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
                     "effect_attention": c.effect_attention, "first_act": c.first_act, "text_range": c.text_range,
                     "fire_on_runs": c.fire_run} for c in top],
            "description": _describe(top, len(circuit.components), n_runs),
        }
        sec.tables["circuit.csv"] = circuit.rows()
    diverged = [c["word"] for c in cells if c["n"] == n_max and c["diverged"]]
    patched = _patch_effect(ctx, words, diverged, n_max, sec)
    progress(steps, steps)

    sec.figure(report_plots.divergence_vs_length(lengths, [rate_by_n[n] for n in lengths], patched),
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
    harm = sec.data.get("harm")
    if harm is not None:
        sec.text(f"Harm of the shipped patch ({DEFAULT_PATCH_METHOD}), measured where it acts: its repetition gate "
                 f"opens on {len(harm['gate_opens'])} of the {harm['documents']} {harm['set'].upper()} "
                 "natural-repetition documents shipped with the package (sinkscope/data/harm/), found from the "
                 f"embeddings alone; KL(original || patched) per token on {len(harm['measured'])} of them (at most "
                 f"{o.harm_documents}, round-robin over families). Ordinary prose such as WikiText never opens the "
                 "gate, so the patch computes exactly the original model there.")
        if harm["rows"]:
            sec.table(harm["rows"], columns=["family", "documents", "gate_opened", "kl_inside", "kl_after", "kl_all",
                                             "ppl_change", "top1_inside", "top1_after"],
                      caption=f"Harm of the {DEFAULT_PATCH_METHOD} patch per family (token-weighted, nats/token)",
                      csv="patch_harm.csv", sortable=False)
    for note in ("circuit_error", "circuit_note", "patch_note"):
        if note in sec.data:
            sec.text(f"Note: {sec.data[note]}.")
    if patched:
        sec.data["patched_rates"] = patched
    for p in explain.explain_repetition(sec.data):
        sec.explain(p)


def _describe(top: list[Any], n: int, run_length: int) -> str:
    best = top[0]
    layers = sorted({c.layer for c in top})
    fire = max(top, key=lambda c: c.fire_run if np.isfinite(c.fire_run) else -1.0)
    runs = (f" On runs of {run_length} copies, neuron {fire.index} of layer {fire.layer} fires above its ordinary "
            f"range at {100 * fire.fire_run:.0f}% of the last positions: the repeated tokens are being marked as "
            "first tokens." if np.isfinite(fire.fire_run) and fire.fire_run > 0 else
            f" None of them fires above its ordinary range on runs of {run_length} copies.")
    return (f"of {n} candidate first-token neurons, ablating neuron {best.index} of layer {best.layer} at token 0 "
            f"removes {100 * best.effect:.0f}% of the sink (residual peak {100 * best.effect_residual:.0f}%, "
            f"attention {100 * best.effect_attention:.0f}%); the top {len(top)} sit in layer(s) "
            f"{', '.join(map(str, layers))}." + runs)


def _patch_effect(ctx: Any, words: list[str], diverged: list[str], n: int, sec: Section) -> dict[int, float] | None:
    """The shipped default patch (``dedup`` of `PATCH_METHODS`, built with its default options, the patch
    ``sinkscope repeat patch`` writes): regenerate the runs of the ``diverged`` words with it, and measure its harm
    where it acts, on the shipped natural-repetition documents (`harm_where_it_acts`). Fills
    ``sec.data["patch"]`` and ``sec.data["harm"]``; returns ``{n: divergence rate over all scanned words with the
    patch}``, or None when no word diverged."""
    built = build_patch(DEFAULT_PATCH_METHOD, patch_method(DEFAULT_PATCH_METHOD).options(),
                        base_model=ctx.model_spec or "model")
    patch = built.patch
    sec.data["harm"] = {"method": built.method, **harm_where_it_acts(ctx.model, ctx.tokenizer, patch, HARM_SET,
                                                                      ctx.options.harm_documents)}
    sec.data["patch"] = {"method": built.method, "description": patch.describe(), "n": n, "words": list(diverged),
                         "still_diverged": None}
    if not diverged:
        sec.data["patch_note"] = (f"no word diverged at {n} copies, so the patch had no divergence to stop; its harm "
                                  "was still measured")
        return None
    tmp = Path(tempfile.mkdtemp(prefix="sinkscope-report-patch-"))
    try:
        plan = GridPlan(list(diverged), ["instruct"], [n], [built.method],
                        max_new_tokens=ctx.options.repeat_new_tokens, batch_size=len(diverged))
        after = run_grid(ctx.model, ctx.tokenizer, plan, {built.method: patch}, tmp).cells
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    still = sum(r["diverged"] for r in after)
    sec.data["patch"]["still_diverged"] = still
    sec.tables["patch_verdicts.csv"] = after
    before = sec.data.get("rates", {}).get(n)
    return {n: float(before) * still / len(after)} if before is not None else None


def harm_where_it_acts(model: Any, tokenizer: Any, patch: Any, harm_set: str, limit: int) -> dict[str, Any]:
    """The patch's harm on the natural-repetition documents of ``harm_set`` (`sinkscope.repetition.harm`) where it
    acts: the documents on which its repetition gate opens (found from the embeddings alone, no forward pass), at
    most ``limit`` of them, taken round-robin over the families in name order (so every family where it opens is
    represented). On the other documents the patched model computes exactly the original (KL 0 by construction).

    Returns ``{"set", "documents" (all in the set), "gate_opens" (names), "measured" (names), "rows"
    (`summarise_harm` over the measured ones), "effects" (per document)}``."""
    docs = load_harm_set(harm_set)
    opens = [d for d in docs if not gate_closed_everywhere(model, patch, encode_doc(tokenizer, d).ids)]
    by_family: dict[str, list[Any]] = {}
    for d in sorted(opens, key=lambda d: d.name):
        by_family.setdefault(d.family, []).append(d)
    chosen: list[Any] = []
    while len(chosen) < limit and any(by_family.values()):
        for fam in sorted(by_family):
            if by_family[fam] and len(chosen) < limit:
                chosen.append(by_family[fam].pop(0))
    out: dict[str, Any] = {"set": harm_set, "documents": len(docs), "gate_opens": [d.name for d in opens],
                           "measured": [d.name for d in chosen], "rows": [], "effects": []}
    if chosen:
        effects = harm_effects(model, tokenizer, {"patch": patch}, chosen)["patch"]
        out["rows"] = summarise_harm(effects)
        out["effects"] = effects_to_json(effects)
    return out
