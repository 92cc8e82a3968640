"""Benchmark of streaming: decode speed against plain ``generate``, the exact block mode, and memory up to 64k tokens.

    python bench/bench_streaming.py [--sections decode,fast,lengths] [--model smollm2-135m] [--threads 1]
                                    [--sinks 4 --window 1020] [--out FILE.json]

Three sections, each printing a table with its ratio to a baseline measured in the same run:

* ``decode`` (issue 14.3): the baseline is plain HF ``generate`` (greedy, a ``DynamicCache``) decoding ``--decode``
  tokens after a ``--context``-token prompt; against it, the token-by-token loop ``stream eval`` runs
  (`sinkscope.streaming.ppl.stream_nll`: one forward per token plus its NLL) for each cache policy, after a chunked
  prefill of the same ``--context`` tokens. Baseline and policies alternate for ``--repeats`` rounds; the table gives
  the best and the median tokens/s and ``generate / path`` (target: <= 1.3). Time per token excludes the prefill.
* ``fast``: the exact block mode (`sinkscope.streaming.banded`, ``--chunk`` queries per forward) scoring a
  ``--fast-tokens``-token stream under dense / window / sinks_plain, in tokens/s and as a multiple of the
  ``generate`` decode speed of the ``decode`` section.
* ``exact`` (not in the default set; a check, not a timing): the block mode against token by token PAST the model's
  context (absolute positions, RoPE extrapolating). The cache is filled exactly by the block mode up to position
  ``--exact-offset`` (8192: SmolLM2's context), then ``--exact-tokens`` more are fed one at a time; the maximum
  NLL difference to the block mode's scores of the same positions is printed.
* ``lengths``: tokens/s and memory of each policy at stream lengths 2k..64k on ``--lengths-model`` (below).

One stream of random tokens per policy. Each checkpoint length L is reached by chunked prefill (``--prefill-chunk``
tokens per forward, which keeps a sink cache bounded), then the last ``--decode`` tokens before L are fed one at a
time and timed: tokens/s is that decode speed at stream length L. Also recorded: the KV-cache size at L (MiB,
exact tensor bytes) and the process RSS high-water mark above the policy's start (MiB, /proc/self/statm). ``dense``
runs up to the model's
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
import os
import statistics
import sys
import time
from typing import Any

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from sinkscope.compat import cache_kwargs
from sinkscope.streaming.banded import banded_stream_nll
from sinkscope.streaming.cache import kv_cache_bytes, sink_cache
from sinkscope.streaming.generate import prefill
from sinkscope.streaming.ppl import CACHE_POLICIES, banded_nll, recompute_nll, rss_bytes, stream_nll

MB = float(1 << 20)


def build_model(spec: str, device: str = "cpu"):
    """``tiny``, ``config:DIR`` (random weights from a model's config.json: timing only, e.g. on a machine without
    the weights) or a `load_model` spec."""
    model, desc = _build_model(spec)
    return model.to(device).eval(), desc


def _build_model(spec: str):
    if spec.startswith("config:"):
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(spec[len("config:"):])
        desc = f"random weights, config of {config.model_type} ({config.num_hidden_layers} layers, " \
            f"d_model {config.hidden_size})"
        return AutoModelForCausalLM.from_config(config), desc
    if spec == "tiny":
        from sinkscope.models.random_hf import tiny_model

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


class _StepClock(StoppingCriteria):
    """A stopping criterion that never stops and records when each generation step ends."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if input_ids.is_cuda:
            torch.cuda.synchronize(input_ids.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate_decode_speed(model, prompt: torch.Tensor, n: int) -> float:
    """tokens/s of plain ``generate`` (greedy, DynamicCache) over ``n`` decode steps after the first token."""
    clock = _StepClock()
    model.generate(prompt[None], **cache_kwargs(model, DynamicCache(config=model.config)), max_new_tokens=n + 1,
                   min_new_tokens=n + 1, do_sample=False, stopping_criteria=StoppingCriteriaList([clock]),
                   pad_token_id=model.config.eos_token_id)
    return n / (clock.times[n] - clock.times[0])


@torch.no_grad()
def stream_decode_speed(model, policy: str, ids: torch.Tensor, context: int, n: int, sinks: int, window: int,
                        chunk: int) -> float:
    """tokens/s of `stream_nll` (the token-by-token ``stream eval`` loop) over ``n`` tokens after a chunked prefill
    of ``context`` tokens."""
    cache = CACHE_POLICIES[policy](model, sinks, window)
    prefill(model, ids[:context - 1][None], cache, chunk_size=chunk)
    return stream_nll(model, ids[context - 1:context + n], cache, name=policy).tokens_per_s


def run_decode(model, args: argparse.Namespace, ids: torch.Tensor) -> list[dict[str, Any]]:
    speeds: dict[str, list[float]] = {"generate": []}
    policies = args.decode_policies.split(",")
    for _ in range(args.repeats):  # alternate, so load drifts hit every path alike
        speeds["generate"].append(generate_decode_speed(model, ids[:args.context], args.decode))
        for p in policies:
            speeds.setdefault(p, []).append(stream_decode_speed(model, p, ids, args.context, args.decode,
                                                                args.sinks, args.window, args.prefill_chunk))
        print(f"decode round done: { {k: round(v[-1], 2) for k, v in speeds.items()} }", file=sys.stderr, flush=True)
    base = max(speeds["generate"])
    return [{"path": k, "tokens_per_s_best": max(v), "tokens_per_s_median": statistics.median(v),
             "generate_over_path": base / max(v), "runs": v} for k, v in speeds.items()]


def run_fast(model, args: argparse.Namespace, ids: torch.Tensor, generate_speed: float | None
             ) -> list[dict[str, Any]]:
    rows = []
    for p in args.fast_policies.split(","):
        r = banded_nll(model, ids[:args.fast_tokens], p, args.sinks, args.window, chunk=args.chunk)
        rows.append({"policy": p, "tokens": len(r.nll), "seconds": r.seconds, "tokens_per_s": r.tokens_per_s,
                     "over_generate_decode": r.tokens_per_s / generate_speed if generate_speed else None,
                     "peak_mem_mb": r.memory["peak_mem_mb"], "note": r.note})
        print(f"fast {p} done: {r.tokens_per_s:.1f} tokens/s", file=sys.stderr, flush=True)
    return rows


@torch.no_grad()
def run_exact(model, args: argparse.Namespace, ids: torch.Tensor) -> dict[str, Any]:
    """Block mode vs token by token for positions ``offset+1 .. offset+k`` (sinks_plain)."""
    n, k, s, w = args.exact_offset, args.exact_tokens, args.sinks, args.window
    t0 = time.perf_counter()
    fast = banded_nll(model, ids[:n + k + 1], "sinks_plain", s, w, chunk=args.chunk).nll[n:n + k]
    cache = CACHE_POLICIES["sinks_plain"](model, s, w)
    banded_stream_nll(model, ids[:n + 1], cache, n_sink=s, window=w, chunk=args.chunk)  # feeds 0..n-1, exactly
    token = stream_nll(model, ids[n:n + k + 1], cache).nll  # feeds n..n+k-1 one at a time
    return {"offset": n, "tokens": k, "max_abs_nll_diff": (fast - token).abs().max().item(),
            "mean_nll": token.double().mean().item(), "seconds": time.perf_counter() - t0}


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
    ap.add_argument("--sections", default="decode,fast,lengths")
    ap.add_argument("--model", default="smollm2-135m", help="model of the decode and fast sections")
    ap.add_argument("--context", type=int, default=1100, help="decode: prompt tokens before the timed steps")
    ap.add_argument("--decode-policies", default="dense,sinks,sinks_plain,window")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fast-tokens", type=int, default=4096)
    ap.add_argument("--fast-policies", default="dense,window,sinks_plain")
    ap.add_argument("--chunk", type=int, default=512, help="fast: queries per forward")
    ap.add_argument("--exact-offset", type=int, default=8192, help="exact: first position fed token by token")
    ap.add_argument("--exact-tokens", type=int, default=32)
    ap.add_argument("--lengths-model", default="tiny", help="model of the lengths section")
    ap.add_argument("--lengths", default="2048,4096,8192,16384,32768,65536")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window", type=int, default=1020)
    ap.add_argument("--policies", default="dense,sinks,recompute,window")
    ap.add_argument("--recompute-sample", type=int, default=128)
    ap.add_argument("--decode", type=int, default=None,
                    help="timed single-token steps (decode section: 64; lengths section: 256 ending at each length)")
    ap.add_argument("--prefill-chunk", type=int, default=512, help="chunk size used to reach each length")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="decode, fast and exact sections (cpu, cuda)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sections = args.sections.split(",")
    result: dict[str, Any] = {"threads": args.threads, "sinks": args.sinks, "window": args.window,
                              "argv": sys.argv[1:], "load_avg_start": os.getloadavg()}
    t0 = time.perf_counter()
    if {"decode", "fast", "exact"} & set(sections):
        model, desc = build_model(args.model, args.device)
        n_ids = max(args.context + (args.decode or 64) + 1, args.fast_tokens, args.exact_offset + args.exact_tokens + 1)
        ids = torch.randint(3, model.config.vocab_size, (n_ids,),
                            generator=torch.Generator().manual_seed(0)).to(args.device)
        with torch.no_grad():
            model(input_ids=ids[:8][None])  # warm-up
        result["model"] = desc
        result["device"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
        gen_speed = None
        if "decode" in sections:
            decode_args = argparse.Namespace(**{**vars(args), "decode": args.decode or 64})
            rows = run_decode(model, decode_args, ids)
            result["decode"] = {"context": args.context, "decode_tokens": decode_args.decode, "rows": rows}
            gen_speed = rows[0]["tokens_per_s_best"]
        if "fast" in sections:
            result["fast"] = {"tokens": args.fast_tokens, "chunk": args.chunk,
                              "rows": run_fast(model, args, ids, gen_speed)}
        if "exact" in sections:
            result["exact"] = run_exact(model, args, ids)
        del model
    if "lengths" in sections:
        result["lengths"] = run_lengths(args, argparse.Namespace(**{**vars(args), "decode": args.decode or 256}))
    result["seconds"] = time.perf_counter() - t0
    result["load_avg_end"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    if "decode" in result:
        print(f"\ndecode after {args.context} tokens, {result['decode']['decode_tokens']} steps, best and median of "
              f"{args.repeats} alternating rounds ({result['model']}, {result['device']}, {args.threads} "
              "thread(s))\n")
        print("| path | tokens/s (best) | tokens/s (median) | generate / path |\n|---|---|---|---|")
        for r in result["decode"]["rows"]:
            name = "generate (HF, DynamicCache)" if r["path"] == "generate" else f"stream eval token loop: {r['path']}"
            print(f"| {name} | {r['tokens_per_s_best']:.2f} | {r['tokens_per_s_median']:.2f} | "
                  f"{r['generate_over_path']:.2f} |")
    if "fast" in result:
        print(f"\nexact block mode, {args.fast_tokens} tokens, chunk {args.chunk}\n")
        print("| policy | tokens scored | seconds | tokens/s | x generate decode | peak KV MiB |\n"
              "|---|---|---|---|---|---|")
        for r in result["fast"]["rows"]:
            x = "n/a" if r["over_generate_decode"] is None else f"{r['over_generate_decode']:.1f}"
            print(f"| {r['policy']} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens_per_s']:.1f} | {x} | "
                  f"{r['peak_mem_mb']:.1f} |")
    if "exact" in result:
        e = result["exact"]
        print(f"\nexact past the context: positions {e['offset'] + 1}..{e['offset'] + e['tokens']}, "
              "block mode vs token "
              f"by token (sinks_plain, {args.sinks} + {args.window}): max |NLL diff| {e['max_abs_nll_diff']:.2e} nats "
              f"(mean NLL {e['mean_nll']:.3f})")
    if "lengths" in result:
        rows, lengths = result["lengths"]["rows"], result["lengths"]["lengths"]
        print(f"\nlengths ({result['lengths']['model']})")
        print("\ntokens/s\n" + table(rows, lengths, "tokens_per_s", "{:.0f}"))
        print("\nKV cache (MiB)\n" + table(rows, lengths, "kv_mb", "{:.2f}"))
        print("\nRSS high-water delta (MiB)\n" + table(rows, lengths, "rss_delta_mb", "{:.1f}"))
    return 0


def run_lengths(args: argparse.Namespace, largs: argparse.Namespace) -> dict[str, Any]:
    """The lengths section: every policy's decode speed and memory at each stream length."""
    lengths = sorted(int(x) for x in args.lengths.split(","))
    model, desc = build_model(args.lengths_model)
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
            rows += run_cached(model, policy, ids, lengths, args.sinks, args.window, context, largs.decode,
                               args.prefill_chunk)
        print(f"{policy} done at {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
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
    return {"model": desc, "lengths": lengths, "rows": rows, "checks": checks}


if __name__ == "__main__":
    sys.exit(main())
