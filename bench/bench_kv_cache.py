"""Head-wise KV cache vs a dense DynamicCache on SmolLM2: stored bytes, process memory, decode seconds per token.

Each method runs in its own fresh subprocess (so peak memory is its own): load the model, prefill a DEV WikiText
prompt of ``--length`` tokens in chunks of ``--chunk``, then decode ``--new`` tokens greedily one forward per token,
``--repeats`` times from the same prefilled state (a copy of the cache each time). Recorded per method:

* ``stored_bytes``: the key/value tensors' bytes after prefill (`HeadwiseCache.stored_bytes`; dense: every layer's
  keys and values);
* ``rss_growth_bytes``: resident memory after prefill + decoding minus after loading the model (what the cache and
  the forwards added), and ``peak_rss_bytes`` (``ru_maxrss``, includes loading the model);
* ``decode_s_per_token``: median over repeats of the mean seconds per decoded token (in that process).

Then one more process times the decode of every method **interleaved** (``--interleave`` repeats, default 9):
every cache is prefilled once, and each round decodes ``--new`` tokens with each method in turn (a fresh copy of
its cache), so a load change on a shared machine hits all methods alike. ``interleaved_s_per_token`` (median of
the rounds) and ``interleaved_min_s_per_token`` (the least disturbed round) go into each row, and
``decode_time_ratio`` is the interleaved median's ratio to dense's (``decode_time_ratio_separate``: the separate
processes' ratio, which drifts with the load).

The head-wise policies: 12.5 / 25 / 50 % of the dense bytes, each with the default window for its budget
(`sinkscope.kv.calibrate.default_window`: 60 / 124 / 252) and its full heads ranked by the committed policy's
stored head scores (`KVPolicy.from_scores`; measured at that policy's window: for memory and speed only the counts
matter). Ratios to dense are computed from the same run. Writes
bench/results/kv_cache.json with the machine load before and after.

    PYTHONPATH=src OMP_NUM_THREADS=1 nice python bench/bench_kv_cache.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLICY = ROOT / "docs" / "results" / "kv" / "policy_smollm2_25"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _policy(model, budget: float, args: argparse.Namespace):
    from sinkscope.kv.calibrate import default_window
    from sinkscope.kv.policy import KVPolicy

    stored = KVPolicy.load(args.policy)
    window = default_window(budget, stored.n_sink, args.length)
    return KVPolicy.from_scores(stored.scores_array(), budget, stored.n_sink, window, args.length,
                                model=model, criterion=stored.info.get("criterion_column", "distant"))


def interleaved(budgets: list[float], args: argparse.Namespace) -> dict:
    """Decode seconds per token of dense and every budget, measured round-robin in one process."""
    import copy

    import torch
    from transformers import DynamicCache

    from sinkscope.compat import cache_kwargs
    from sinkscope.kv.cache import headwise_cache
    from sinkscope.kv.calibration_data import dev_prose
    from sinkscope.models.load import load_model

    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    ids = tok(dev_prose()[: 12 * args.length], add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = ids[:, :args.length]
    caches = {"dense": DynamicCache(config=model.config)}
    for b in budgets:
        caches[f"headwise {b}"] = headwise_cache(model, _policy(model, b, args))
    firsts = {}
    with torch.no_grad():
        for name, cache in caches.items():
            for a in range(0, args.length, args.chunk):
                out = model(input_ids=ids[:, a:a + args.chunk], use_cache=True, **cache_kwargs(model, cache))
            firsts[name] = out.logits[:, -1:].argmax(-1)
        times: dict[str, list[float]] = {name: [] for name in caches}
        for _ in range(args.interleave):
            for name, cache in caches.items():
                c = copy.deepcopy(cache)
                nxt = firsts[name]
                t0 = time.perf_counter()
                for _ in range(args.new):
                    nxt = model(input_ids=nxt, use_cache=True, **cache_kwargs(model, c)).logits[:, -1:].argmax(-1)
                times[name].append((time.perf_counter() - t0) / args.new)
    return times


def worker(method: str, budget: float, args: argparse.Namespace) -> dict:
    import copy

    import torch
    from transformers import DynamicCache

    from sinkscope.compat import cache_kwargs
    from sinkscope.kv.cache import headwise_cache
    from sinkscope.kv.calibration_data import dev_prose
    from sinkscope.models.load import load_model

    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    ids = tok(dev_prose()[: 12 * args.length], add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = ids[:, :args.length]
    with torch.no_grad():  # page the weights in (they are memory-mapped) before the baseline
        model(input_ids=ids[:, :args.chunk], use_cache=False)
    base = _rss()
    if method == "dense":
        cache = DynamicCache(config=model.config)
        policy = None
    else:
        policy = _policy(model, budget, args)
        cache = headwise_cache(model, policy)
    with torch.no_grad():
        for a in range(0, args.length, args.chunk):
            out = model(input_ids=ids[:, a:a + args.chunk], use_cache=True, **cache_kwargs(model, cache))
        first = out.logits[:, -1:].argmax(-1)
        if method == "dense":
            stored_bytes = sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers)
        else:
            stored_bytes = cache.stored_bytes()
        per_token = []
        for _ in range(args.repeats):
            c = copy.deepcopy(cache)
            nxt = first
            t0 = time.perf_counter()
            for _ in range(args.new):
                nxt = model(input_ids=nxt, use_cache=True, **cache_kwargs(model, c)).logits[:, -1:].argmax(-1)
            per_token.append((time.perf_counter() - t0) / args.new)
    per_token.sort()
    return {"method": method, "budget": budget if policy is not None else 1.0,
            "n_full": None if policy is None else policy.n_full, "window": None if policy is None else policy.window,
            "policy_bytes_fraction": None if policy is None else policy.bytes_fraction(args.length),
            "stored_bytes": stored_bytes, "rss_growth_bytes": _rss() - base,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "decode_s_per_token": per_token[len(per_token) // 2], "decode_s_per_token_all": per_token}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budgets", default="0.125,0.25,0.5")
    ap.add_argument("--policy", default=str(POLICY))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "kv_cache.json"))
    ap.add_argument("--interleave", type=int, default=9, help="rounds of the interleaved decode timing")
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "BUDGET"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        if args.worker[0] == "interleaved":
            print(json.dumps(interleaved([float(b) for b in args.worker[1].split(",")], args)))
        else:
            print(json.dumps(worker(args.worker[0], float(args.worker[1]), args)))
        return
    load_before = os.getloadavg()
    runs = [("dense", 1.0)] + [("headwise", float(b)) for b in args.budgets.split(",")]
    rows = []
    for method, budget in runs:
        cmd = [sys.executable, __file__, "--worker", method, str(budget), "--length", str(args.length),
               "--chunk", str(args.chunk), "--new", str(args.new), "--repeats", str(args.repeats),
               "--threads", str(args.threads), "--policy", args.policy]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    cmd = [sys.executable, __file__, "--worker", "interleaved", args.budgets, "--length", str(args.length),
           "--chunk", str(args.chunk), "--new", str(args.new), "--interleave", str(args.interleave),
           "--threads", str(args.threads), "--policy", args.policy]
    load_mid = os.getloadavg()
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    times = json.loads(res.stdout.strip().splitlines()[-1])
    for r in rows:
        t = sorted(times["dense" if r["method"] == "dense" else f"headwise {r['budget']}"])
        r["interleaved_s_per_token"] = t[len(t) // 2]
        r["interleaved_min_s_per_token"] = t[0]
        r["interleaved_all"] = t
    dense = rows[0]
    for r in rows:
        r["stored_bytes_ratio"] = r["stored_bytes"] / dense["stored_bytes"]
        r["rss_growth_ratio"] = r["rss_growth_bytes"] / dense["rss_growth_bytes"]
        r["peak_rss_ratio"] = r["peak_rss_bytes"] / dense["peak_rss_bytes"]
        r["decode_time_ratio_separate"] = r["decode_s_per_token"] / dense["decode_s_per_token"]
        r["decode_time_ratio"] = r["interleaved_s_per_token"] / dense["interleaved_s_per_token"]
        r["decode_time_ratio_min"] = r["interleaved_min_s_per_token"] / dense["interleaved_min_s_per_token"]
    for r in rows:
        print(f"{r['method']:9s} budget {r['budget']:.3f}: stored {r['stored_bytes'] / 2**20:6.2f} MiB "
              f"({r['stored_bytes_ratio']:.3f} of dense), RSS growth {r['rss_growth_bytes'] / 2**20:6.1f} MiB "
              f"({r['rss_growth_ratio']:.2f}), peak {r['peak_rss_bytes'] / 2**20:6.0f} MiB, decode "
              f"{1000 * r['interleaved_s_per_token']:.1f} ms/token interleaved ({r['decode_time_ratio']:.2f}x dense; "
              f"least disturbed round {r['decode_time_ratio_min']:.2f}x; separate processes "
              f"{r['decode_time_ratio_separate']:.2f}x)")
    from sinkscope.io import write_json_atomic

    write_json_atomic(Path(args.out), {
        "model": "smollm2-135m", "length": args.length, "prefill_chunk": args.chunk, "new_tokens": args.new,
        "repeats": args.repeats, "threads": args.threads, "policy": os.path.relpath(args.policy, ROOT),
        "interleave": args.interleave,
        "rows": rows, "load_average_before": load_before, "load_average_before_interleaved": load_mid,
        "load_average_after": os.getloadavg(),
        "cpu_count": os.cpu_count(), "command": " ".join(["python", "bench/bench_kv_cache.py", *sys.argv[1:]])})


if __name__ == "__main__":
    main()
