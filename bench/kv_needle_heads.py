"""Which kv heads retrieve the passkey, and did the policy keep them? A diagnostic of the calibrated ranking.

For each EVAL passkey prompt (`sinkscope.kv.suite`), one eager dense forward gives every head's attention from the
last prompt token (the query that predicts the key's first digit) to the needle's tokens; per kv head the masses of
its query heads are summed (GQA), then averaged over the prompts. A head with a large needle mass is a retrieval
head: if the policy makes it a streaming head, the needle falls out of its window and the answer is lost.

    OMP_NUM_THREADS=1 python bench/kv_needle_heads.py --policy docs/results/kv/eval_policy --length 1024 \\
        --out docs/results/kv/needle_heads.json

Writes, per kv head: needle mass, rank by needle mass, the policy's distant-mass score and rank, and whether the
policy (re-cut at each ``--budgets``) keeps it in full.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--depths", default="0.1,0.5,0.9")
    p.add_argument("--budgets", default="0.125,0.25,0.5")
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args(argv)

    from sinkscope import load_model
    from sinkscope.io import write_json_atomic
    from sinkscope.kv.evaluate import policy_at_budget
    from sinkscope.kv.policy import KVPolicy
    from sinkscope.kv.suite import SuiteSpec, build_suite

    policy = KVPolicy.load(a.policy)
    model, tok = load_model("smollm2-135m", attn_implementation="eager")
    cfg = model.config
    L, H, G = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    suite = build_suite(tok, SuiteSpec(lengths=(a.length,), depths=tuple(float(d) for d in a.depths.split(",")),
                                       tasks=("passkey",)))
    mass = np.zeros((L, H))
    for item in suite.items:
        s, e = item.needle_span
        with torch.no_grad():
            out = model(torch.tensor([item.ids]), output_attentions=True)
        for layer, att in enumerate(out.attentions):  # (1, heads, T, T)
            per_q = att[0, :, -1, s:e].sum(-1).double().numpy()  # (heads,)
            mass[layer] += per_q.reshape(H, G).sum(-1)
        del out
    mass /= len(suite.items)
    distant = policy.scores_array()[..., 0]
    order_needle = np.argsort(-mass.ravel(), kind="stable")
    order_distant = np.argsort(-distant.ravel(), kind="stable")
    rank_needle = np.empty(L * H, dtype=int)
    rank_needle[order_needle] = np.arange(L * H)
    rank_distant = np.empty(L * H, dtype=int)
    rank_distant[order_distant] = np.arange(L * H)
    budgets = [float(b) for b in a.budgets.split(",")]
    kept = {b: policy_at_budget(policy, b, a.length).full_matrix() for b in budgets}
    heads = []
    for i in range(L * H):
        layer, h = divmod(i, H)
        heads.append({"layer": layer, "kv_head": h, "needle_mass": float(mass[layer, h]),
                      "needle_rank": int(rank_needle[i]), "distant_mass": float(distant[layer, h]),
                      "distant_rank": int(rank_distant[i]),
                      "kept_full": {f"{b:g}": bool(kept[b][layer, h]) for b in budgets}})
    top = [heads[i] for i in order_needle[:10]]
    summary = {
        "prompts": [it.key for it in suite.items], "length": a.length, "policy": str(a.policy),
        "spearman_needle_vs_distant": float(np.corrcoef(rank_needle, rank_distant)[0, 1]),
        "top10_needle_heads": [(t["layer"], t["kv_head"]) for t in top],
        "top10_kept_at": {f"{b:g}": sum(t["kept_full"][f"{b:g}"] for t in top) for b in budgets},
        "needle_mass_share_of_top10": float(sum(t["needle_mass"] for t in top) / mass.sum()),
    }
    write_json_atomic(a.out, {"summary": summary, "heads": heads})
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
