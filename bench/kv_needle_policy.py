"""Diagnostic: is the calibrated policy's miss the ranking or the cache? Rank the kv heads by needle attention on
DEV passkey prompts instead of distant mass, cut at the same budget, and evaluate on the same EVAL suite.

Needle attention per kv head: on passkey prompts built from the DEV half of WikiText-2 (calibration text, never
evaluated; keys from seeds 5000+), the attention from the question's last token to the needle's tokens, summed over
the kv head's query heads, averaged over the prompts (one eager dense forward each). The heads with the most keep
the full cache; the rest keep the calibrated policy's sinks + window. Dense and this policy then run through
`sinkscope.kv.evaluate` on the EVAL suite of `docs/results/kv/eval` (same spec).

    OMP_NUM_THREADS=1 python bench/kv_needle_policy.py --policy docs/results/kv/eval_policy --budget 0.25 \\
        --out docs/results/kv/needle_policy
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch


def needle_scores(model, tok, length: int, depths: tuple[float, ...], seed: int) -> np.ndarray:
    """(layers, kv heads) mean attention from the last prompt token to the needle, on DEV passkey prompts."""
    from sinkscope.corpora import corpus_path
    from sinkscope.kv.suite import SuiteSpec, build_suite, split_articles

    dev = "".join(split_articles(corpus_path().read_text(encoding="utf-8"))[0])
    suite = build_suite(tok, SuiteSpec(lengths=(length,), depths=depths, tasks=("passkey",), seed=seed), prose=dev)
    cfg = model.config
    L, H = cfg.num_hidden_layers, cfg.num_key_value_heads
    G = cfg.num_attention_heads // H
    mass = np.zeros((L, H))
    model.set_attn_implementation("eager")
    try:
        for item in suite.items:
            s, e = item.needle_span
            with torch.no_grad():
                out = model(torch.tensor([item.ids]), output_attentions=True)
            for layer, att in enumerate(out.attentions):
                mass[layer] += att[0, :, -1, s:e].sum(-1).double().numpy().reshape(H, G).sum(-1)
            del out
    finally:
        model.set_attn_implementation("sdpa")
    return mass / len(suite.items)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="the calibrated policy (its sinks and window are kept)")
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--depths", default="0.1,0.5,0.9")
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args(argv)

    from sinkscope import load_model
    from sinkscope.io import OutputLock, check_output_dir, write_json_atomic
    from sinkscope.kv.evaluate import (
        EvalOptions,
        MethodContext,
        _headwise,
        build_methods,
        evaluate,
        summary_markdown,
        threads_note,
    )
    from sinkscope.kv.policy import KVPolicy
    from sinkscope.kv.suite import SuiteSpec, build_suite
    from sinkscope.viz.kv import plot_quality_vs_bytes

    torch.set_num_threads(1)
    calibrated = KVPolicy.load(a.policy)
    out = check_output_dir(a.out)
    depths = tuple(float(d) for d in a.depths.split(","))
    with OutputLock(out):
        model, tok = load_model("smollm2-135m")
        mass = needle_scores(model, tok, a.length, depths, seed=5000)
        scores = np.stack([mass, np.zeros_like(mass), np.zeros_like(mass)], -1)

        def policy_at(length: int) -> KVPolicy:
            return KVPolicy.from_scores(scores, a.budget, calibrated.n_sink, calibrated.window, length, model=model,
                                        criterion="needle attention on DEV passkey prompts")

        p0 = policy_at(a.length)
        p0.save(out / "policy")
        write_json_atomic(out / "needle_scores.json", {"needle_mass": mass.tolist(), "seed": 5000,
                                                       "length": a.length, "depths": list(depths)})
        methods = build_methods(model, ["dense"], MethodContext(None, (), (), calibrated.n_sink))
        methods.append(_headwise("needle_policy", a.budget, None, policy_at,
                                 {"n_sink": calibrated.n_sink, "window": calibrated.window,
                                  "note": "diagnostic: heads ranked by DEV needle attention"}))
        spec = SuiteSpec(lengths=(a.length,), depths=depths, n_agree=1)
        suite = build_suite(tok, spec)
        result = evaluate(model, tok, suite, methods, out, EvalOptions(),
                          settings={"model": "smollm2-135m", "policy": p0.to_json(), "bench": "kv_needle_policy"})
        result.settings["run"] = {"argv": sys.argv[1:], **threads_note()}
        result.save(out, plot=plot_quality_vs_bytes)
    print(summary_markdown(result.summary()))
    print("full heads:", [(l, h) for l, hs in enumerate(p0.full_heads) for h in hs])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
