"""Benchmark: the two ways of computing the softmax's column sums against the first fused pass, per layer.

SmolLM2-shaped heads (9 query heads, 3 kv heads, head dim 64, one sequence), random inputs, CPU. Per length, the
best of ``--repeats`` alternating rounds of: the first pass (``attention_lse``, SDPA's fused kernel with its
log-sum-exp), the blocked column sums (the default) and the swapped kernel call. Prints each time and its ratio to
the first pass, and writes JSON.

    python bench/bench_column_sums.py --threads 1 --lengths 512,2048,8192
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from sinkscope.io import write_json_atomic
from sinkscope.metrics import attention_fused as af


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="512,2048,8192")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("bench/results/profile_column_sums.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    H, Hkv, D = 9, 3, 64
    rows = []
    load = os.getloadavg()
    print(f"{torch.get_num_threads()} threads, load {load[0]:.2f}")
    print("| T | first pass ms | blocked ms | ratio | swapped ms | ratio |\n|---|---|---|---|---|---|")
    for T in (int(x) for x in args.lengths.split(",")):
        g = torch.Generator().manual_seed(T)
        q = torch.randn(1, T, H, D, generator=g).transpose(1, 2)  # the layout models pass
        k = torch.randn(1, T, Hkv, D, generator=g).transpose(1, 2)
        v = torch.randn(1, T, Hkv, D, generator=g).transpose(1, 2)
        valid = torch.ones(1, T, dtype=torch.bool)
        _, lse = af.attention_lse(q, k, v, D**-0.5)
        runs = {
            "first_pass": lambda: af.attention_lse(q, k, v, D**-0.5),
            "blocked": lambda: af.softmax_column_sums(q, k, lse, D**-0.5, query_weight=valid),
            "swapped": lambda: af.softmax_column_sums(q, k, lse, D**-0.5, query_weight=valid, how="swapped"),
        }
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(args.repeats):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
        row = {"T": T, **{f"{n}_s": t for n, t in best.items()}, "load": os.getloadavg()}
        rows.append(row)
        f = best["first_pass"]
        print(f"| {T} | {f * 1e3:.1f} | {best['blocked'] * 1e3:.1f} | {best['blocked'] / f:.2f}x | "
              f"{best['swapped'] * 1e3:.1f} | {best['swapped'] / f:.2f}x |", flush=True)
    write_json_atomic(args.out, {"command": " ".join(["python", *sys.argv]), "threads": torch.get_num_threads(),
                                 "load_at_start": load, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
