"""Benchmark: tokens/s and memory of each streaming policy at stream lengths 2k..64k, in one run.

    python bench/bench_streaming.py [--lengths 2048,4096,8192,16384,32768,65536] [--sinks 4 --window 1020]
                                    [--policies dense,window,sinks,recompute] [--model tiny|smollm2-135m]
                                    [--threads 1] [--out FILE.json]

One stream of random tokens per policy. Each checkpoint length L is reached by chunked prefill (``--prefill-chunk``
tokens per forward, which keeps a sink cache bounded), then the last ``--decode`` tokens before L are fed one at a
time and timed: tokens/s is that decode speed at stream length L. Also recorded: the KV-cache size at L (MiB,
exact tensor bytes) and the process RSS high-water mark above the policy's start (MiB, /proc/self/statm). ``dense`` runs up to the model's
context (8192 for the default tiny model, like SmolLM2) and reports ``null`` past it. ``recompute`` costs the
same per token at every position, so at each checkpoint it scores the last ``--recompute-sample`` positions
before it (batched windows) instead of the whole prefix.

The default model is a random Llama (2 layers, d_model 128, 4 heads, 2 kv heads, context 8192): SmolLM2 is
memory-bandwidth bound at ~15 tokens/s on CPU, so 64k tokens would take hours. Prints a JSON object and a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch
from transformers import DynamicCache

from sinkscope.compat import cache_kwargs
from sinkscope.streaming.cache import kv_cache_bytes, sink_cache
from sinkscope.streaming.generate import prefill
from sinkscope.streaming.ppl import recompute_nll, rss_bytes

MB = float(1 << 20)


def build_model(spec: str):
    if spec == "tiny":
        from sinkscope.models.tiny import tiny_model

        return tiny_model("llama", hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                          num_hidden_layers=2, intermediate_size=256, vocab_size=512,
                          max_position_embeddings=8192), "tiny random llama (2 layers, d_model 128, 4 heads, 2 kv)"
    from sinkscope.models.load import load_model

    return load_model(spec)[0], spec


@torch.no_grad()
def run_cached(model, policy: str, ids: torch.Tensor, lengths: list[int], sinks: int, window: int,
               context: int | None, decode: int, chunk: int) -> list[dict[str, Any]]:
    """Reach each length by chunked prefill, then time ``decode`` single-token steps ending at that length."""
    cache = (DynamicCache(config=model.config) if policy == "dense"
             else sink_cache(model, 0 if policy == "window" else sinks, window + (sinks if policy == "window" else 0),
                             reassign=policy != "sinks_plain"))
    rows, rss0, peak_rss, done = [], rss_bytes(), rss_bytes(), 0
    for L in lengths:
        if context is not None and policy == "dense" and L > context:
            rows.append({"policy": policy, "length": L, "tokens_per_s": None, "kv_mb": None, "rss_delta_mb": None,
                         "note": f"past the model's context ({context})"})
            continue
        start = max(done, L - decode)
        if start > done:
            prefill(model, ids[done:start][None], cache, chunk_size=chunk)
        peak_rss = max(peak_rss, rss_bytes())
        t0 = time.perf_counter()
        for t in range(start, L):
            model(input_ids=ids[t:t + 1][None], **cache_kwargs(model, cache), use_cache=True)
        dt = time.perf_counter() - t0
        peak_rss = max(peak_rss, rss_bytes())
        rows.append({"policy": policy, "length": L, "tokens_per_s": (L - start) / dt,
                     "kv_mb": kv_cache_bytes(cache) / MB, "rss_delta_mb": (peak_rss - rss0) / MB})
        done = L
    return rows


def run_recompute(model, ids: torch.Tensor, lengths: list[int], sinks: int, window: int, sample: int,
                  batch_size: int) -> list[dict[str, Any]]:
    rows = []
    for L in lengths:
        positions = range(max(1, L - sample), L)
        r = recompute_nll(model, ids[:L], sinks + window, positions=positions, batch_size=batch_size)
        rows.append({"policy": "recompute", "length": L, "tokens_per_s": r.tokens_per_s,
                     "kv_mb": r.memory["peak_mem_mb"], "rss_delta_mb": r.memory["peak_rss_delta_mb"],
                     "note": f"last {len(positions)} positions scored"})
    return rows


def table(rows: list[dict[str, Any]], lengths: list[int], key: str, fmt: str) -> str:
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    head = "| policy | " + " | ".join(f"{L // 1024}k" for L in lengths) + " |"
    lines = [head, "|" + "---|" * (len(lengths) + 1)]
    for p in policies:
        vals = {r["length"]: r[key] for r in rows if r["policy"] == p}
        lines.append(f"| {p} | " + " | ".join("n/a" if vals.get(L) is None else fmt.format(vals[L])
                                             for L in lengths) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--lengths", default="2048,4096,8192,16384,32768,65536")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window", type=int, default=1020)
    ap.add_argument("--policies", default="dense,sinks,recompute,window")
    ap.add_argument("--recompute-sample", type=int, default=128)
    ap.add_argument("--decode", type=int, default=256, help="timed single-token steps ending at each length")
    ap.add_argument("--prefill-chunk", type=int, default=512, help="chunk size used to reach each length")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lengths = sorted(int(x) for x in args.lengths.split(","))
    model, desc = build_model(args.model)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (lengths[-1],), generator=torch.Generator().manual_seed(0))
    context = getattr(model.config, "max_position_embeddings", None)
    with torch.no_grad():
        model(input_ids=ids[:8][None])  # warm-up
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for policy in args.policies.split(","):
        if policy == "recompute":
            rows += run_recompute(model, ids, lengths, args.sinks, args.window, args.recompute_sample,
                                  args.batch_size)
        else:
            rows += run_cached(model, policy, ids, lengths, args.sinks, args.window, context, args.decode,
                               args.prefill_chunk)
        print(f"{policy} done at {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if args.out:  # partial results survive an interrupted run
            with open(args.out, "w") as f:
                json.dump({"model": desc, "partial": True, "rows": rows}, f, indent=2)
    by = {(r["policy"], r["length"]): r for r in rows}
    checks: dict[str, Any] = {}
    if ("sinks", 4096) in by and ("sinks", lengths[-1]) in by:
        a, b = by[("sinks", 4096)]["kv_mb"], by[("sinks", lengths[-1])]["kv_mb"]
        checks["sinks_kv_growth_4k_to_max"] = b / a - 1
        ra, rb = by[("sinks", 4096)]["rss_delta_mb"], by[("sinks", lengths[-1])]["rss_delta_mb"]
        checks["sinks_rss_delta_4k_and_max_mb"] = [ra, rb]
    if ("sinks", 2048) in by and ("dense", 2048) in by:
        checks["dense_over_sinks_tokens_per_s_at_2k"] = by[("sinks", 2048)]["tokens_per_s"] and (
            by[("dense", 2048)]["tokens_per_s"] / by[("sinks", 2048)]["tokens_per_s"])
    result = {"model": desc, "sinks": args.sinks, "window": args.window, "threads": args.threads,
              "lengths": lengths, "rows": rows, "checks": checks, "seconds": time.perf_counter() - t0,
              "argv": sys.argv[1:]}
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    print("\ntokens/s\n" + table(rows, lengths, "tokens_per_s", "{:.0f}"))
    print("\nKV cache (MiB)\n" + table(rows, lengths, "kv_mb", "{:.2f}"))
    print("\nRSS high-water delta (MiB)\n" + table(rows, lengths, "rss_delta_mb", "{:.1f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
