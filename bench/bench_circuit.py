"""Benchmark: `repeat circuit`'s search, the original algorithm against the fast one, phase by phase, in one run.

    python bench/bench_circuit.py [--model smollm2-135m] [--threads 1] [--layers every3|all|0,3,6] [--words 2]
                                  [--n 512] [--exact 32] [--no-exhaustive] [--out FILE.json]
    python bench/bench_circuit.py --compare runs/exhaustive/circuit.json runs/fast/circuit.json

Both sides run in the same process on the same inputs (the command's defaults: the default corpus, 8 x 32 text
tokens for the ablations, zero ablation at token 0, the default candidates). Phases:

* ``ordinary ranges``: `neuron_stats` on the calibration text; original = ``torch.quantile`` and full LM-head
  logits (as on main), fast = `quantile_dim0` and ``logits_to_keep=1`` (bit-identical statistics).
* ``ablations``: original = one full forward per candidate (`reference_effects`); fast = `search_effects` (batched
  variants, truncated at each candidate's layer, attribution pruning down to ``--exact`` candidates).
* ``runs``: original = greedy generation, then a second forward over the runs to read activations; fast = the
  activations are read from generation's own prefill pass.

By default the ablation phase covers the candidates of every third layer (``--layers all``: every layer, the
command's full search; on a loaded 2-core machine the original side then takes half an hour) and the runs phase
2 words: both sides are measured, nothing is extrapolated. Wall and CPU (process) seconds are printed with the
machine's load average; the ranking line compares the two sides' effects. Prints a JSON object and a markdown
table. ``--compare`` compares two finished `repeat circuit` runs instead (top-10, Spearman, effect differences).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sinkscope.inputs import pad_batch
from sinkscope.interventions.ablate import Component
from sinkscope.models.adapters import get_adapter
from sinkscope.models.generate import greedy_continue
from sinkscope.models.load import load_model
from sinkscope.repetition import activations
from sinkscope.repetition.circuit import _run_captures, first_token_neurons
from sinkscope.repetition.corpus import calibration_sequences, read_corpus, text_chunks
from sinkscope.repetition.prompts import build_prompt
from sinkscope.repetition.sink_effects import (
    eager_attention,
    reference_effects,
    search_effects,
)
from sinkscope.repetition.words import PATCH_WORDS


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall s, CPU s of this process)."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def original_neuron_stats(model: torch.nn.Module, seqs: list[list[int]]) -> Any:
    """`neuron_stats` as on main: torch.quantile, every position's logits."""
    saved = activations.quantile_dim0, activations.few_logits
    activations.quantile_dim0 = lambda x, q: torch.quantile(x, q, dim=0)
    activations.few_logits = lambda model: {}
    try:
        return activations.neuron_stats(model, seqs)
    finally:
        activations.quantile_dim0, activations.few_logits = saved


@torch.no_grad()
def original_runs(model: torch.nn.Module, prompts: list[list[int]], layers: list[int], last: int) -> None:
    """Generation, then a second forward over the runs with hooks (main's `_fire_on_runs`)."""
    a = get_adapter(model)
    greedy_continue(model, prompts, max_new_tokens=24, batch_size=8)
    ids, mask = pad_batch(prompts, int(model.config.pad_token_id or 0), side="left")
    got: dict[Any, torch.Tensor] = {}
    hooks = [a.mlp_down_module(l).register_forward_pre_hook(
        lambda m, args, l=l: got.__setitem__(("n", l), args[0][:, -last:].float())) for l in layers]
    hooks += [a.output_projection(l).register_forward_pre_hook(
        lambda m, args, l=l: got.__setitem__(("h", l), args[0][:, -last:].float())) for l in a.attention_layers]
    try:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in hooks:
            h.remove()


def ranking(ref: dict[Component, float], fast: dict[Component, float], k: int = 10) -> dict[str, Any]:
    """Top-k overlap, whether the top-k order is the same, Spearman over the candidates both ablated exactly."""
    r = sorted(ref, key=lambda c: -ref[c])
    f = sorted(fast, key=lambda c: -fast[c])
    common = [c for c in r if c in fast]
    ra = np.argsort(np.argsort([-ref[c] for c in common]))
    fa = np.argsort(np.argsort([-fast[c] for c in common]))
    return {"top_k": k, "overlap": len(set(r[:k]) & set(f[:k])), "same_order": r[:k] == f[:k],
            "spearman_exact": float(np.corrcoef(ra, fa)[0, 1]) if len(common) > 2 else float("nan"),
            "max_abs_diff": max(abs(ref[c] - fast[c]) for c in common) if common else float("nan"),
            "top": [c.name for c in r[:k]], "fast_top": [c.name for c in f[:k]]}


def compare_files(exhaustive: str, fast: str, k: int = 10) -> int:
    """Print the ranking comparison of two circuit.json files (exact components only on the fast side)."""
    def load(path: str) -> tuple[dict[Component, float], dict[str, Any]]:
        d = json.loads(Path(path).read_text())
        eff = {Component(c["layer"], c["kind"], c["index"]): float(c["effect"]) for c in d["components"]
               if c.get("exact", True)}
        return eff, d["settings"]

    ref, _ = load(exhaustive)
    got, settings = load(fast)
    r = ranking(ref, got, k)
    order = [[(c["layer"], c["kind"], c["index"]) for c in json.loads(Path(f).read_text())["components"]]
             for f in (exhaustive, fast)]
    pos = {c: i for i, c in enumerate(order[1])}
    r["spearman_all"] = float(np.corrcoef(np.arange(len(order[0])), [pos[c] for c in order[0]])[0, 1])
    r["same_prefix"] = next((i for i, (x, y) in enumerate(zip(*order)) if x != y), len(order[0]))
    print(json.dumps({"exhaustive": exhaustive, "fast": fast, "fast_settings": settings, **r}, indent=1))
    print(f"top-{k} overlap {r['overlap']}/{k}, same order {r['same_order']}; the first {r['same_prefix']} ranks "
          f"identical; Spearman over the {len(got)} "
          f"components ablated in both {r['spearman_exact']:.4f}, over all {len(order[0])} in the order each file "
          f"ranks them {r['spearman_all']:.4f}; max |effect difference| {r['max_abs_diff']:.2e}")
    print("| rank | exhaustive | fast |\n|---|---|---|")
    for i, (a, b) in enumerate(zip(r["top"], r["fast_top"])):
        print(f"| {i + 1} | {a} ({ref[_parse(a)]:.3f}) | {b} ({got[_parse(b)]:.3f}) |")
    return 0


def _parse(name: str) -> Component:
    layer, rest = name[1:].split(".")
    return Component(int(layer), "neuron" if rest[0] == "N" else "head", int(rest[1:]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a busy shared machine two threads ran 4x slower)")
    p.add_argument("--layers", default="every3", help="'every3' (default), 'all', or a comma list")
    p.add_argument("--words", type=int, default=2, help="run words (the command uses 8)")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--exact", type=int, default=32)
    p.add_argument("--no-exhaustive", action="store_true", help="skip the original side's ablations")
    p.add_argument("--out", default=None)
    p.add_argument("--compare", nargs=2, metavar=("EXHAUSTIVE.json", "FAST.json"),
                   help="only compare the rankings of two `repeat circuit` outputs (circuit.json) and stop")
    args = p.parse_args(argv)
    if args.compare:
        return compare_files(*args.compare)
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    a = get_adapter(model)
    text = read_corpus(None)
    rows: list[dict[str, Any]] = []

    def row(phase: str, orig: tuple[float, float] | None, fast: tuple[float, float]) -> None:
        rows.append({"phase": phase, "original_wall_s": orig[0] if orig else None,
                     "original_cpu_s": orig[1] if orig else None, "fast_wall_s": fast[0], "fast_cpu_s": fast[1],
                     "load": os.getloadavg()[0]})

    cal = calibration_sequences(tok, text)
    stats_o, *t_o = timed(lambda: original_neuron_stats(model, cal))
    stats_f, *t_f = timed(lambda: activations.neuron_stats(model, cal))
    same_stats = all(torch.equal(x, y) for n in ("first", "other_max", "other_q", "other_median")
                     for x, y in zip(getattr(stats_o, n), getattr(stats_f, n)))
    row("ordinary ranges", tuple(t_o), tuple(t_f))

    layers = (list(range(a.n_layers)) if args.layers == "all" else list(range(0, a.n_layers, 3))
              if args.layers == "every3" else [int(x) for x in args.layers.split(",")])
    cands = [Component(l, "neuron", j) for l, j, _ in first_token_neurons(model, stats_f) if l in layers]
    cands += [Component(l, "head", h) for l in a.attention_layers if l in layers for h in range(a.n_heads)]
    ids = torch.tensor(text_chunks(tok, text, n=8, length=32, offset=10))
    stages: dict[str, list[float]] = {}  # stage -> [wall s, CPU s] spent in it (fast side)
    clock = {"stage": None, "w": 0.0, "c": 0.0}

    def on_stage(stage: str, done: int, total: int) -> None:
        w, c = time.perf_counter(), time.process_time()
        if clock["stage"] is not None:
            acc = stages.setdefault(clock["stage"], [0.0, 0.0])
            acc[0] += w - clock["w"]
            acc[1] += c - clock["c"]
        clock.update(stage=stage, w=w, c=c)

    found, *t_f = timed(lambda: search_effects(model, ids, cands, exact=args.exact, progress=on_stage))
    on_stage("", 0, 0)
    fast = {c: max(found.shares(v)) for c, v in found.exact.items()}
    rank = None
    if not args.no_exhaustive:
        def orig_ablations() -> dict[Component, tuple[float, float]]:
            with eager_attention(model):
                return reference_effects(model, ids, cands)
        ref, *t_o = timed(orig_ablations)
        rank = ranking({c: max(found.shares(v)) for c, v in ref.items()}, fast)
        row(f"ablations ({len(cands)} candidates, {len(found.exact)} exact)", tuple(t_o), tuple(t_f))
    else:
        row(f"ablations ({len(cands)} candidates, {len(found.exact)} exact)", None, tuple(t_f))

    words = list(PATCH_WORDS[:args.words])
    prompts = [build_prompt(tok, w, args.n, "instruct", max_positions=a.max_positions, reserve=24).ids for w in words]
    neuron_layers = sorted({c.layer for c in cands if c.kind == "neuron"})
    _, *t_o = timed(lambda: original_runs(model, prompts, neuron_layers, 16))
    _, *t_f = timed(lambda: _run_captures(model, prompts, neuron_layers, 16, 24, 8, lambda *_: None))
    row(f"runs ({len(words)} words x {args.n})", tuple(t_o), tuple(t_f))

    if all(r["original_wall_s"] is not None for r in rows):
        rows.append({"phase": "total", **{k: sum(r[k] for r in rows) for k in
                                          ("original_wall_s", "original_cpu_s", "fast_wall_s", "fast_cpu_s")},
                     "load": os.getloadavg()[0]})
    result = {"model": args.model, "threads": args.threads, "layers": layers, "exact": args.exact,
              "fast_ablation_stages": stages, "nonlinear_groups": [f"L{g['layer']} {g['kind']}s" for g in found.groups
                                                                   if not g["linear"]],
              "identical_neuron_stats": same_stats, "ranking": rank, "rows": rows,
              "uptime_load": os.getloadavg()}
    print(json.dumps(result, indent=1, default=str))
    print(f"\n{args.model}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}; "
          f"neuron stats identical: {same_stats}")
    print("| phase | original wall s | original CPU s | fast wall s | fast CPU s | ratio (wall) | ratio (CPU) |")
    print("|---|---|---|---|---|---|---|")
    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    def ratio(o: float | None, f: float) -> str:
        return "-" if o is None else f"{o / f:.1f}x"

    for r in rows:
        ow, oc = r["original_wall_s"], r["original_cpu_s"]
        print(f"| {r['phase']} | {fmt(ow)} | {fmt(oc)} | {r['fast_wall_s']:.1f} | {r['fast_cpu_s']:.1f} | "
              f"{ratio(ow, r['fast_wall_s'])} | {ratio(oc, r['fast_cpu_s'])} |")
    print("fast ablation stages (wall s / CPU s): " + ", ".join(f"{k} {v[0]:.1f} / {v[1]:.1f}"
                                                             for k, v in stages.items()))
    if rank:
        print(f"\nranking: top-{rank['top_k']} overlap {rank['overlap']}/{rank['top_k']}, same order "
              f"{rank['same_order']}, Spearman over exactly ablated {rank['spearman_exact']:.4f}, "
              f"max |effect difference| {rank['max_abs_diff']:.2e}")
    if args.out:
        from sinkscope.io import write_json_atomic

        write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
