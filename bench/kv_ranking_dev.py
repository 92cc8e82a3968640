"""Which ranking criterion and window should `sinkscope kv calibrate` use? Measured on DEV data only.

For SmolLM2 at the target length, ranks the kv heads on the DEV ranking pieces and measures the held-out DEV KL
(nats/token, positions t > n_sink + window, `sinkscope.kv.calibrate`) of: the distant-mass ranking, the drop-error
ranking, random heads (seeds 0, 1) and the uniform sinks + window cache at the same bytes, at each budget.
Writes bench/results/kv_ranking_dev.json.

    PYTHONPATH=src OMP_NUM_THREADS=1 nice python bench/kv_ranking_dev.py [--windows 60] [--budgets 0.125,0.25,0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from sinkscope.io import write_json_atomic
from sinkscope.kv.calibrate import _KL
from sinkscope.kv.calibration_data import calibration_sets
from sinkscope.kv.mass import head_masses
from sinkscope.kv.policy import KVPolicy, window_for_budget
from sinkscope.models.load import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--windows", default="60")
    ap.add_argument("--budgets", default="0.125,0.25,0.5")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--methods", default="distant,drop_error,random,uniform")
    ap.add_argument("--out", default="bench/results/kv_ranking_dev.json")
    args = ap.parse_args()
    model, tok = load_model("smollm2-135m")
    sets = calibration_sets(tok, args.length)
    rows = []
    t_start = time.time()
    for window in (int(w) for w in args.windows.split(",")):
        t0 = time.process_time()
        scores = head_masses(model, sets.ranking, n_sink=args.sinks, window=window)
        mass_cpu = time.process_time() - t0
        kl = _KL(model, sets.held_out, args.sinks + window + 1)
        for budget in (float(b) for b in args.budgets.split(",")):
            methods = args.methods.split(",")
            policies = {c: KVPolicy.from_scores(scores, budget, args.sinks, window, args.length, model=model,
                                                criterion=c) for c in ("distant", "drop_error") if c in methods}
            if "random" in methods:
                policies.update({f"random{s}": KVPolicy.random(model, budget, args.sinks, window, args.length,
                                                               seed=s) for s in range(args.seeds)})
            if "uniform" in methods:
                policies["uniform"] = KVPolicy.uniform(model, args.sinks, window_for_budget(budget, args.sinks,
                                                                                            args.length), args.length)
            for name, p in policies.items():
                value = kl(p)
                rows.append({"window": window, "budget": budget, "method": name, "bytes_fraction": p.budget,
                             "n_full": p.n_full, "kl": value})
                print(json.dumps(rows[-1]), flush=True)
        rows.append({"window": window, "ranking_cpu_seconds": mass_cpu})
    write_json_atomic(Path(args.out), {
        "model": "smollm2-135m", "length": args.length, "sinks": args.sinks, "rows": rows,
        "held_out": sets.held_out_kinds, "ranking": sets.ranking_kinds, "kl_positions": "t > n_sink + window",
        "wall_seconds": time.time() - t_start, "load_average": os.getloadavg(), "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
