"""Benchmark: wall time and peak memory of the sink profile vs a bare SDPA forward vs eager output_attentions.

Each (method, T) runs in a fresh subprocess that loads the model, then samples its resident memory every few ms
while the method runs; "peak MB" is the peak resident memory above the loaded model. The children run with a
fixed glibc mmap threshold (MALLOC_MMAP_THRESHOLD_=65536), so freed large tensors go back to the OS at once and
resident memory follows live memory rather than the allocator's heap growth. Prints a table with the
ratios to the bare forward measured in the same run, and writes JSON.

    python bench/bench_profile.py --lengths 512 1024 2048 4096 8192 --out bench/results/profile.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

METHODS = ("bare_sdpa", "profile", "eager_attentions")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _child(method: str, T: int, model_spec: str) -> None:
    import torch

    from sinkscope.inputs import random_inputs
    from sinkscope.models.load import load_model
    from sinkscope.profile import profile_sinks

    torch.manual_seed(0)
    model, tok = load_model(model_spec)
    batch = random_inputs(tok, T, 1, seed=0)
    ids = torch.tensor(batch.sequences)
    with torch.no_grad():  # warm-up on a short input (allocator, kernels)
        model(ids[:, :64])
    base = _rss_mb()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    with torch.no_grad():
        if method == "bare_sdpa":
            model(ids, use_cache=False)
        elif method == "profile":
            profile_sinks(model, batch)
        else:
            model.set_attn_implementation("eager")
            model(ids, use_cache=False, output_attentions=True)
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    peak[0] = max(peak[0], _rss_mb())
    print(json.dumps({"method": method, "T": T, "wall_s": wall, "peak_mb": peak[0] - base}))


def eager_attention_gb(T: int, n_layers: int = 30, n_heads: int = 9) -> float:
    """Memory of all layers' fp32 attention maps that output_attentions returns."""
    return n_layers * n_heads * T * T * 4 / 2**30


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--eager-max-gb", type=float, default=8.0,
                    help="skip eager output_attentions when its attention maps alone would exceed this")
    ap.add_argument("--out", type=Path, default=Path("bench/results/profile.json"))
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "T"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child[0], int(args.child[1]), args.model)
        return 0
    rows = []
    for T in args.lengths:
        for method in METHODS:
            if method == "eager_attentions" and eager_attention_gb(T) > args.eager_max_gb:
                rows.append({"method": method, "T": T, "wall_s": None, "peak_mb": None,
                             "skipped": f"attention maps alone need {eager_attention_gb(T):.0f} GB"})
                print(f"T={T:5d} {method:17s} skipped ({rows[-1]['skipped']})", flush=True)
                continue
            cmd = [sys.executable, __file__, "--model", args.model, "--child", method, str(T)]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode != 0:
                rows.append({"method": method, "T": T, "wall_s": None, "peak_mb": None,
                             "skipped": f"failed: {res.stderr.strip().splitlines()[-1] if res.stderr else res.returncode}"})
            else:
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"T={T:5d} {method:17s} {rows[-1]}", flush=True)
    by = {(r["method"], r["T"]): r for r in rows}
    lines = ["| T | bare SDPA s | profile s | ratio | eager+attentions s | bare MB | profile MB | ratio | eager MB |",
             "|---|---|---|---|---|---|---|---|---|"]

    def fmt(x: float | None, p: int = 1) -> str:
        return "n/a" if x is None else f"{x:.{p}f}"

    for T in args.lengths:
        b, p, e = by[("bare_sdpa", T)], by[("profile", T)], by[("eager_attentions", T)]
        tr = p["wall_s"] / b["wall_s"] if p["wall_s"] and b["wall_s"] else None
        mr = p["peak_mb"] / b["peak_mb"] if p["peak_mb"] and b["peak_mb"] else None
        eager_t = fmt(e["wall_s"]) if e["wall_s"] is not None else f"skipped ({e['skipped']})"
        lines.append(f"| {T} | {fmt(b['wall_s'])} | {fmt(p['wall_s'])} | {fmt(tr, 2)}x | {eager_t} | "
                     f"{fmt(b['peak_mb'], 0)} | {fmt(p['peak_mb'], 0)} | {fmt(mr, 2)}x | {fmt(e['peak_mb'], 0)} |")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
