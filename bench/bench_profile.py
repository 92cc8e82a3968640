"""Benchmark: wall time and peak memory of the sink profile against a bare SDPA forward of the same model.

Two measurements, each printed as a markdown table with the ratio to the bare forward measured in the same run:

1. **One process, alternating** (the timing that counts): the model is loaded once; for each length T the bare
   forward, the profile with the fused statistics (the default) and the profile with the chunked reference
   statistics run in turn, ``--repeats`` times (the order reversed every other round), and the best time of each
   is kept. On CPU the fused profile's time is split into its parts: the first pass (the fused kernel that gives
   the output and each query's log-sum-exp, the same kernel as SDPA's), the column sums, the rest of the
   statistics (cosines, counts, norms), the profiler's forward hooks (residual norms, massive activations, MLP
   neurons), and the rest (the model itself outside attention, the profiler's bookkeeping).
2. **One fresh process per figure** (the memory measurement, and the old way of timing): each (method, T) runs in
   a new process that loads the model and samples its resident memory every few ms; "peak MB" is the peak
   above the loaded model. Children run with MALLOC_MMAP_THRESHOLD_=65536 so that freed large tensors go back
   to the OS at once and resident memory follows live memory. On CUDA the peak comes from the allocator
   (``max_memory_allocated``) in the one process instead, and no children run.

The machine's load (``os.getloadavg()``) and torch's thread count are recorded with the results. Examples:

    python bench/bench_profile.py                                  # CPU, T = 512 ... 8192, writes profile.json
    python bench/bench_profile.py --lengths 512,2048 --repeats 2 --no-fresh
    python bench/bench_profile.py --device cuda --lengths 512,2048,8192 --quick   # profile_cuda.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FRESH_METHODS = ("bare_sdpa", "profile", "eager_attentions")
DTYPES = ("float32", "bfloat16", "float16")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _load(model_spec: str, device: str, dtype: str):
    import torch

    from sinkscope.models.load import load_model

    return load_model(model_spec, device=device, dtype=getattr(torch, dtype))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _stats_users() -> tuple[Any, list[Any]]:
    """``attention_with_stats`` and the sinkscope modules that call it by that name."""
    from sinkscope.metrics import attention_stats

    original = attention_stats.attention_with_stats
    users = [m for name, m in list(sys.modules.items()) if name.startswith("sinkscope.") and m is not attention_stats
             and getattr(m, "attention_with_stats", None) is original]
    if not users:
        raise RuntimeError("no sinkscope module calls attention_with_stats: the benchmark needs updating")
    return original, users


class _PassTimer:
    """Adds up the wall time of the statistics' parts while installed (CPU only: calls are synchronous)."""

    PARTS = {"attention_lse": "first_pass_s", "softmax_column_sums": "column_sums_s"}

    def __init__(self) -> None:
        self.totals = dict.fromkeys(["stats_s", *self.PARTS.values(), "hooks_s", "sdpa_s"], 0.0)

    def wrap(self, fn: Any, key: str) -> Any:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[key] += time.perf_counter() - t0
        return timed


@contextlib.contextmanager
def _profile_patches(method: str, timer: _PassTimer | None) -> Iterator[None]:
    """Make the profiler compute its statistics with ``method`` (it has no such option: the benchmark's way to
    time the chunked reference inside ``profile_sinks``), timing their parts with ``timer``."""
    from sinkscope.metrics import attention_stats

    original, users = _stats_users()
    stats = functools.partial(original, method=method)
    saved: list[tuple[Any, str, Any]] = [(m, "attention_with_stats", original) for m in users]
    if timer is not None:
        stats = timer.wrap(stats, "stats_s")
        for name, key in timer.PARTS.items():
            saved.append((attention_stats, name, getattr(attention_stats, name)))
            setattr(attention_stats, name, timer.wrap(getattr(attention_stats, name), key))
    if timer is not None:  # the profiler's forward hooks (residual norms, massive activations, MLP neurons)
        from sinkscope import hooks as hooks_module

        plain = hooks_module.forward_hooks

        def timed_hooks(hooks: list[tuple[Any, Any, bool]]) -> Any:
            return plain([(mod, timer.wrap(fn, "hooks_s"), pre) for mod, fn, pre in hooks])

        # every module that holds the function (collectors import it from sinkscope.capture when they run)
        for name, m in list(sys.modules.items()):
            if name.startswith("sinkscope.") and getattr(m, "forward_hooks", None) is plain:
                saved.append((m, "forward_hooks", plain))
                m.forward_hooks = timed_hooks
    for m in users:
        m.attention_with_stats = stats
    try:
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


def _in_process(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Bare forward, fused profile and chunked profile, alternating in one process; best of ``repeats``."""
    import torch

    from sinkscope.inputs import random_inputs
    from sinkscope.profile import profile_sinks

    torch.manual_seed(0)
    model, tok = _load(args.model, args.device, args.dtype)
    cuda = args.device.startswith("cuda")
    rows = []
    for T in args.lengths:
        batch = random_inputs(tok, T, 1, seed=0)
        ids = torch.tensor(batch.sequences, device=args.device)
        load_before = os.getloadavg()
        with torch.no_grad():  # warm-up (allocator, kernels) on a short input
            model(ids[:, :64], use_cache=False)
            profile_sinks(model, random_inputs(tok, 64, 1, seed=1))
        best: dict[str, float] = {}
        parts: dict[str, dict[str, float]] = {}
        peak: dict[str, float] = {}
        profiles: dict[str, Any] = {}

        def run(what: str) -> None:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            _sync(args.device)
            timer = None
            t0 = time.perf_counter()
            with torch.no_grad():
                if what == "bare_sdpa":
                    model(ids, use_cache=False)
                else:
                    timer = None if cuda else _PassTimer()
                    with _profile_patches(what, timer):
                        profiles[what] = profile_sinks(model, batch)
            _sync(args.device)
            wall = time.perf_counter() - t0
            if what not in best or wall < best[what]:
                best[what] = wall
                if timer is not None:
                    parts[what] = dict(timer.totals)
            if cuda:
                peak[what] = max(peak.get(what, 0.0), (torch.cuda.max_memory_allocated() - base) / 2**20)

        order = ["bare_sdpa", "fused", "chunked"]
        for r in range(args.repeats):
            for what in (order if r % 2 == 0 else order[::-1]):
                run(what)
                print(f"  T={T} round {r + 1}: {what:9s} {best[what]:.2f} s (best so far)", flush=True)
        if not cuda:  # one more bare forward, its SDPA calls timed: the model's time outside attention
            row_bare = _timed_bare_forward(model, ids)
        row: dict[str, Any] = {
            "T": T, "bare_s": best["bare_sdpa"], "fused_s": best["fused"], "chunked_s": best["chunked"],
            "fused_ratio": best["fused"] / best["bare_sdpa"], "chunked_ratio": best["chunked"] / best["bare_sdpa"],
            "repeats": args.repeats, "load_before": load_before, "load_after": os.getloadavg(),
        }
        if parts:
            p = parts["fused"]
            row["fused_parts"] = {**p, "other_stats_s": p["stats_s"] - p["first_pass_s"] - p["column_sums_s"],
                                  "rest_s": best["fused"] - p["stats_s"] - p["hooks_s"]}
            row["chunked_stats_s"] = parts["chunked"]["stats_s"]
        if not cuda:
            row["bare_parts"] = row_bare
        row["fused_vs_chunked_max_abs"] = _differences(profiles["fused"], profiles["chunked"])
        if cuda:
            row["peak_mb"] = peak
        rows.append(row)
        print(f"T={T}: bare {row['bare_s']:.2f} s, fused {row['fused_s']:.2f} s ({row['fused_ratio']:.2f}x), "
              f"chunked {row['chunked_s']:.2f} s ({row['chunked_ratio']:.2f}x), load {load_before[0]:.2f}; "
              f"fused vs chunked max |diff| {row['fused_vs_chunked_max_abs']}",
              flush=True)
    return rows


def _timed_bare_forward(model: Any, ids: Any) -> dict[str, float]:
    """A bare SDPA forward with its attention calls timed (through a registered copy of SDPA's function)."""
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    timer = _PassTimer()
    AttentionInterface.register("bench_sdpa_timed", timer.wrap(sdpa_attention_forward, "sdpa_s"))
    ALL_MASK_ATTENTION_FUNCTIONS.register("bench_sdpa_timed", sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation("bench_sdpa_timed")
    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            model(ids, use_cache=False)
        total = time.perf_counter() - t0
    finally:
        model.set_attn_implementation(previous)
    return {"total_s": total, "sdpa_s": timer.totals["sdpa_s"], "outside_sdpa_s": total - timer.totals["sdpa_s"]}


def _differences(a: Any, b: Any) -> dict[str, float]:
    """Largest difference of each statistic between two profiles of the same input: absolute for the
    probabilities and cosines, relative for the norms (which carry the model's scale)."""
    import numpy as np

    out = {}
    for name in ("alpha", "cos_first", "cos_other", "sink_mass", "out_norm", "value_norm"):
        x, y = getattr(a, name), getattr(b, name)
        if x is not None and y is not None:
            d = np.abs(x - y)
            out[name] = float(np.nanmax(d / np.abs(y)) if name.endswith("norm") else np.nanmax(d))
    return out


def _child(method: str, T: int, args: argparse.Namespace) -> None:
    """One fresh-process figure: wall time and peak resident memory above the loaded model."""
    import torch

    from sinkscope.inputs import random_inputs
    from sinkscope.profile import profile_sinks

    torch.manual_seed(0)
    model, tok = _load(args.model, args.device, args.dtype)
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


def _fresh(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for T in args.lengths:
        for method in FRESH_METHODS:
            if method == "eager_attentions" and eager_attention_gb(T) > args.eager_max_gb:
                rows.append({"method": method, "T": T, "wall_s": None, "peak_mb": None,
                             "skipped": f"attention maps alone need {eager_attention_gb(T):.0f} GB"})
                continue
            cmd = [sys.executable, __file__, "--model", args.model, "--device", args.device, "--dtype", args.dtype,
                   "--child", method, str(T)] + (["--threads", str(args.threads)] if args.threads else [])
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode != 0:
                last = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"
                rows.append({"method": method, "T": T, "wall_s": None, "peak_mb": None, "skipped": f"failed: {last}"})
            else:
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"  fresh process T={T} {method}: {rows[-1]}", flush=True)
    return rows


def _fmt(x: float | None, p: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{p}f}"


def in_process_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| T | statistics | bare SDPA forward s | profile s | ratio |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['T']} | fused (default) | {_fmt(r['bare_s'])} | {_fmt(r['fused_s'])} | "
                     f"{_fmt(r['fused_ratio'])}x |")
        lines.append(f"| {r['T']} | chunked (reference) | {_fmt(r['bare_s'])} | {_fmt(r['chunked_s'])} | "
                     f"{_fmt(r['chunked_ratio'])}x |")
    return "\n".join(lines)


def parts_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| T | bare s (SDPA s + rest s, one timed run) | fused profile s | 1st pass s | column sums s | "
             "other statistics s | hooks s | rest s | chunked statistics s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, b = r.get("fused_parts"), r.get("bare_parts")
        if p and b:
            lines.append(f"| {r['T']} | {_fmt(r['bare_s'])} ({_fmt(b['sdpa_s'])} + {_fmt(b['outside_sdpa_s'])}) | "
                         f"{_fmt(r['fused_s'])} | {_fmt(p['first_pass_s'])} | {_fmt(p['column_sums_s'])} | "
                         f"{_fmt(p['other_stats_s'])} | {_fmt(p['hooks_s'])} | {_fmt(p['rest_s'])} | "
                         f"{_fmt(r['chunked_stats_s'])} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def fresh_table(rows: list[dict[str, Any]], lengths: list[int]) -> str:
    by = {(r["method"], r["T"]): r for r in rows}
    lines = ["| T | bare SDPA s | profile s | ratio | eager+attentions s | bare MB | profile MB | ratio | eager MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for T in lengths:
        b, p, e = by[("bare_sdpa", T)], by[("profile", T)], by[("eager_attentions", T)]
        tr = p["wall_s"] / b["wall_s"] if p["wall_s"] and b["wall_s"] else None
        mr = p["peak_mb"] / b["peak_mb"] if p["peak_mb"] and b["peak_mb"] else None
        eager_t = _fmt(e["wall_s"], 1) if e["wall_s"] is not None else f"skipped ({e['skipped']})"
        lines.append(f"| {T} | {_fmt(b['wall_s'], 1)} | {_fmt(p['wall_s'], 1)} | {_fmt(tr)}x | {eager_t} | "
                     f"{_fmt(b['peak_mb'], 0)} | {_fmt(p['peak_mb'], 0)} | {_fmt(mr)}x | {_fmt(e['peak_mb'], 0)} |")
    return "\n".join(lines)


def _machine(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {"device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
                            "cpu_count": os.cpu_count(), "platform": platform.platform(),
                            "torch": torch.__version__, "transformers": transformers.__version__}
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _lengths(values: list[str]) -> list[int]:
    return [int(x) for v in values for x in v.split(",") if x.strip()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", nargs="+", default=["512,1024,2048,4096,8192"],
                    help="sequence lengths, comma- or space-separated")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=DTYPES)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the in-process comparison (best of)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--quick", action="store_true", help="one round, no fresh-process figures")
    ap.add_argument("--no-fresh", action="store_true", help="skip the fresh-process figures (memory, old timing)")
    ap.add_argument("--eager-max-gb", type=float, default=8.0,
                    help="skip eager output_attentions when its attention maps alone would exceed this")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON output (default bench/results/profile.json, profile_<device>.json off CPU)")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "T"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.lengths = _lengths(args.lengths)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        _child(args.child[0], int(args.child[1]), args)
        return 0
    if args.quick:
        args.repeats, args.no_fresh = 1, True
    cuda = args.device.startswith("cuda")
    out = args.out or Path("bench/results") / ("profile.json" if args.device == "cpu" else
                                               f"profile_{args.device.split(':')[0]}.json")
    t0 = time.perf_counter()
    machine = {**_machine(args), "load_at_start": os.getloadavg()}
    print(f"machine: {machine}", flush=True)
    rows = _in_process(args)
    fresh = [] if (args.no_fresh or cuda) else _fresh(args)
    machine["load_at_end"] = os.getloadavg()
    machine["elapsed_s"] = time.perf_counter() - t0
    tables = {"in_process": in_process_table(rows), "fused_parts": parts_table(rows)}
    if fresh:
        tables["fresh_process"] = fresh_table(fresh, args.lengths)
    header = (f"{args.model}, {args.device} {args.dtype}, {machine['threads']} threads, load (1/5/15 min) "
              f"{' / '.join(f'{x:.2f}' for x in machine['load_at_start'])} at start, "
              f"{' / '.join(f'{x:.2f}' for x in machine['load_at_end'])} at end")
    print(header)
    for name, table in tables.items():
        if table:
            print(f"\n{name}:\n{table}")
    out.parent.mkdir(parents=True, exist_ok=True)
    from sinkscope.io import write_json_atomic

    write_json_atomic(out, {"command": " ".join(["python", *sys.argv]), "machine": machine, "in_process": rows,
                            "fresh_process": fresh, "tables": tables, "header": header})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
