"""Choose the repetition patch's de-duplication settings on development material only (issue 13, item 4).

Every candidate is run on the DEV words (`sinkscope.repetition.words.DEV_WORDS`, a fixed slice) at N = 1024 in
the instruction form with 128-token answers, and measured on the DEV natural-repetition documents and held-out
WikiText. The rule below picks one; the chosen patch is saved, and only then evaluated on the EVAL words and the
EVAL documents (`sinkscope repeat evaluate --word-set eval --harm-sets eval`), once.

Rule (written before any candidate was run):
1. a candidate qualifies when, on DEV material, divergence falls >= 80% relative, the harm documents' mean KL
   (token-weighted over every position) < 0.01 nats/token with their perplexity within 1%, and WikiText's KL
   < 0.01 with perplexity within 1%;
2. among qualifying candidates, the highest relative reduction wins; ties go to the lower harm KL;
3. if none qualifies on harm, the lowest harm KL among those reaching 80%; if none reaches 80%, the highest
   reduction.

    python experiments/repeat_chain.design.py OUT [--model SPEC] [--device cuda] [--words 64]

Writes OUT/design.json (every candidate's numbers and the choice), OUT/dev_grid/ (the answers) and OUT/chosen/
(the chosen patch's manifest, base model as given by --base).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from sinkscope.corpora import corpus_path
from sinkscope.interventions.patch import RepetitionGate, SinkPatch, save_patch
from sinkscope.io import write_json_atomic
from sinkscope.models.load import load_model
from sinkscope.repetition.corpus import calibration_sequences, heldout_sequences, read_corpus
from sinkscope.repetition.direction import build_direction_patch
from sinkscope.repetition.grid import NO_PATCH, GridPlan, run_grid, summarise_cells
from sinkscope.repetition.harm import load_harm_set
from sinkscope.repetition.side_effects import side_effects
from sinkscope.repetition.words import word_set

#: candidate de-duplication settings (gate: window 32, mean cosine >= 0.8); the CPU round documented in
#: docs/repetition.md measured these on 8 DEV words (keep8 on the 3 hardest) and on every DEV document
CANDIDATES: dict[str, dict] = {
    "dedup-all": {"dedup_keep": 1, "dedup_queries": "all"},  # the earlier default (flags persist)
    "dedup-gated": {"dedup_keep": 1, "dedup_queries": "gated", "dedup_reach": 0},
    "dedup-gated-r8": {"dedup_keep": 1, "dedup_queries": "gated", "dedup_reach": 8},
    "keep8-gated": {"dedup_keep": 8, "dedup_queries": "gated", "dedup_reach": 0},
    "keep32-gated": {"dedup_keep": 32, "dedup_queries": "gated", "dedup_reach": 0},
}
#: candidates that add the first-token-direction clamp (measured on DEV words) to a de-duplication setting
WITH_CLAMP: dict[str, str] = {}


def choose(rows: dict[str, dict]) -> tuple[str, str]:
    """The rule of the module docstring on ``{name: {"reduction", "harm_kl", "harm_ppl", "text_kl",
    "text_ppl"}}``; returns (name, which branch of the rule decided)."""
    def harm_ok(r: dict) -> bool:
        return (r["harm_kl"] < 0.01 and abs(r["harm_ppl"]) < 0.01 and r["text_kl"] < 0.01
                and abs(r["text_ppl"]) < 0.01)

    good = [n for n, r in rows.items() if r["reduction"] >= 0.8 and harm_ok(rows[n])]
    if good:
        return min(good, key=lambda n: (-rows[n]["reduction"], rows[n]["harm_kl"])), "qualified"
    strong = [n for n, r in rows.items() if r["reduction"] >= 0.8]
    if strong:
        return min(strong, key=lambda n: rows[n]["harm_kl"]), "none within the harm limits"
    return max(rows, key=lambda n: rows[n]["reduction"]), "none reached 80%"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--base", default="smollm2-135m", help="base model spec written into the chosen manifest")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--words", type=int, default=64, help="the first K DEV words")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--harm", default="dev", help="harm set (dev; a directory for tests)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    model, tok = load_model(args.model, device=args.device)
    words = word_set("dev", tok)[:args.words]
    text = read_corpus(corpus_path())
    gate = RepetitionGate(32, 0.8)
    patches = {n: SinkPatch([], args.base, gate=gate, attention_dedup=True, meta={"method": "dedup", "candidate": n},
                            **kw) for n, kw in CANDIDATES.items()}
    if WITH_CLAMP:
        clamp, _ = build_direction_patch(model, tok, calibration_sequences(tok, text), words[:8], base_model=args.base,
                                         n=args.n, attention_dedup=True)
        for name, base in WITH_CLAMP.items():
            patches[name] = dataclasses.replace(clamp, meta={**clamp.meta, "candidate": name}, **CANDIDATES[base])
    plan = GridPlan(words, ["instruct"], [args.n], [NO_PATCH, *patches], args.max_new_tokens, args.batch_size)
    print(f"design: {plan.n_cells} answers on {len(words)} DEV words, {len(patches)} candidates", flush=True)
    cells = run_grid(model, tok, plan, {NO_PATCH: None, **patches}, args.out / "dev_grid",
                     progress=lambda d, t, w="": print(f"[{d}/{t}] {w} ({time.perf_counter() - t0:.0f} s)",
                                                       flush=True)).cells
    summary = {r["variant"]: r for r in summarise_cells(cells)}
    effects = side_effects(model, tok, patches, heldout_sequences(tok, text), {"dev": load_harm_set(args.harm)},
                           batch_size=8, sink_ratio=False)
    rows = {}
    for name in patches:
        fam = {r["family"]: r for r in effects[name]["harm"]["dev"]["families"]}
        s = summary[name]
        rows[name] = {"reduction": s["relative_reduction"] if s["rate_unpatched"] > 0 else 0.0,
                      "rate": s["rate"], "rate_unpatched": s["rate_unpatched"], "stopped": s["stopped"],
                      "harm_kl": fam["all"]["kl_all"], "harm_kl_after": fam["all"]["kl_after"],
                      "harm_kl_inside": fam["all"]["kl_inside"], "harm_ppl": fam["all"]["ppl_change"],
                      "harm_worst_family_kl": max(r["kl_all"] for f, r in fam.items() if f != "all"),
                      "text_kl": effects[name]["text"]["kl"], "text_ppl": effects[name]["text"]["ppl_change"],
                      "families": fam}
        r = rows[name]
        print(f"{name:>24}: diverged {r['rate_unpatched']:.0%} -> {r['rate']:.0%} (reduction {r['reduction']:.0%}, "
              f"stopped {r['stopped']}), dev harm KL {r['harm_kl']:.4f} (inside {r['harm_kl_inside']:.4f}, after "
              f"{r['harm_kl_after']:.4f}, worst family {r['harm_worst_family_kl']:.4f}), ppl {r['harm_ppl']:+.2%}; "
              f"WikiText KL {r['text_kl']:.1e}", flush=True)
    chosen, why = choose(rows)
    save_patch(dataclasses.replace(patches[chosen], base_model=args.base), args.out / "chosen")
    write_json_atomic(args.out / "design.json", {"chosen": chosen, "why": why, "candidates": rows,
                                                 "settings": {k: str(v) for k, v in vars(args).items()},
                                                 "words": words, "elapsed_s": time.perf_counter() - t0})
    print(f"chosen: {chosen} ({why}): {patches[chosen].describe()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
