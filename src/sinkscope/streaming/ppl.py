"""Token-by-token perplexity of a long stream under KV-cache policies: dense, window, sinks + window, recompute.

Each policy predicts token ``t + 1`` from token ``t`` and what its cache kept (Xiao et al. 2023, Sec. 4.1, Fig. 3):

* ``dense``: the full cache (``DynamicCache``), only up to the model's trained context.
* ``window``: the last ``n_sink + window`` tokens (same memory budget as ``sinks``), no sinks.
* ``sinks``: the first ``n_sink`` plus the last ``window`` tokens, positions re-assigned by cache slot (StreamingLLM).
* ``sinks_plain``: the same tokens, absolute positions kept (no re-assignment).
* ``recompute``: the quality reference -- for every token, re-run the model from scratch on the last
  ``n_sink + window + 1`` tokens (batched: many windows in one forward; identical results to one forward per token).

A query always sees at most ``n_sink + window`` earlier tokens plus itself under every bounded policy.

Memory. ``peak_mem_mb`` is the peak size of the key/value tensors the policy holds (MiB, summed over layers: for
cache policies the stored cache after each step, for ``recompute`` the K/V of one ``n_sink + window + 1``-token
window). ``peak_rss_delta_mb`` is the process resident-set high-water mark above its value when the policy started
(``/proc/self/statm``, sampled every step; it includes activations and allocator slack, and is noisy on CPU).
On CUDA, ``peak_cuda_mb`` is ``torch.cuda.max_memory_allocated`` during the policy.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Cache, DynamicCache

from sinkscope.compat import cache_kwargs
from sinkscope.errors import InputError
from sinkscope.models.adapters import get_adapter
from sinkscope.registry import Registry
from sinkscope.streaming.cache import kv_cache_bytes, sink_cache

#: Cache policies: name -> factory(model, n_sink, window) -> Cache. ``recompute`` is handled separately.
CACHE_POLICIES: Registry[Callable[[nn.Module, int, int], Cache]] = Registry("stream policy")
CACHE_POLICIES.add("dense", lambda model, n_sink, window: DynamicCache(config=model.config))
CACHE_POLICIES.add("window", lambda model, n_sink, window: sink_cache(model, 0, n_sink + window))
CACHE_POLICIES.add("sinks", lambda model, n_sink, window: sink_cache(model, n_sink, window, reassign=True))
CACHE_POLICIES.add("sinks_plain", lambda model, n_sink, window: sink_cache(model, n_sink, window, reassign=False))

#: Every policy name, in report order; DEFAULT_POLICIES is what ``sinkscope stream eval`` runs by default.
ALL_POLICIES: tuple[str, ...] = ("dense", "window", "sinks", "sinks_plain", "recompute")
DEFAULT_POLICIES: tuple[str, ...] = ("dense", "window", "sinks", "recompute")

_MB = float(1 << 20)


def rss_bytes() -> int:
    """Current resident set size of this process (bytes; 0 where ``/proc`` is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class _MemoryMeter:
    """Tracks peak KV bytes, RSS high-water delta and (on CUDA) peak allocated bytes over one policy run."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        self.device = device
        self.rss0 = rss_bytes()
        self.peak_rss = self.rss0
        self.peak_kv = 0

    def sample(self, kv_bytes: int) -> None:
        self.peak_kv = max(self.peak_kv, kv_bytes)
        self.peak_rss = max(self.peak_rss, rss_bytes())

    def summary(self) -> dict[str, float]:
        out = {"peak_mem_mb": self.peak_kv / _MB, "peak_rss_delta_mb": (self.peak_rss - self.rss0) / _MB}
        if self.cuda:
            out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(self.device) / _MB
        return out


@dataclass(frozen=True)
class PolicyResult:
    """Per-token negative log-likelihoods of one policy.

    Attributes:
        name: policy name.
        positions: (N,) index in the stream of each predicted token (1..T-1).
        nll: (N,) negative log-likelihood of that token, nats.
        seconds: wall time of the run.
        memory: ``peak_mem_mb`` (KV tensors), ``peak_rss_delta_mb`` and, on CUDA, ``peak_cuda_mb``.
        note: why the run stopped early, if it did (e.g. past the model's context).
    """

    name: str
    positions: torch.Tensor
    nll: torch.Tensor
    seconds: float
    memory: dict[str, float]
    note: str = ""

    @property
    def ppl(self) -> float:
        """exp(mean NLL); NaN when no token was scored."""
        return math.exp(self.nll.double().mean().item()) if len(self.nll) else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return len(self.nll) / self.seconds if self.seconds > 0 else float("nan")

    def ppl_after(self, position: int) -> float:
        """Perplexity over the predicted tokens at ``position`` and later."""
        sel = self.nll[self.positions >= position]
        return math.exp(sel.double().mean().item()) if len(sel) else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {"ppl": self.ppl, "tokens": len(self.nll), "tokens_per_s": self.tokens_per_s,
                "seconds": self.seconds, **self.memory, **({"note": self.note} if self.note else {})}


@dataclass(frozen=True)
class StreamEval:
    """All policies' results on one stream. ``to_json()`` is ``summary.json``; ``to_rows()`` the per-token CSV."""

    policies: dict[str, PolicyResult]
    n_tokens: int
    n_sink: int
    window: int
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        evict_from = self.n_sink + self.window + 1
        return {
            "tokens": self.n_tokens, "n_sink": self.n_sink, "window": self.window,
            "cache_budget": self.n_sink + self.window, "eviction_starts_at_position": evict_from,
            "policies": {k: {**v.to_json(), "ppl_after_eviction": v.ppl_after(evict_from)}
                         for k, v in self.policies.items()},
            "memory_measure": {"peak_mem_mb": "peak MiB of key/value tensors held by the policy (all layers)",
                               "peak_rss_delta_mb": "process RSS high-water mark above its value at policy start"},
            **self.meta,
        }

    def to_rows(self) -> list[dict[str, Any]]:
        """One row per (policy, predicted token): ``policy, position, nll``."""
        rows: list[dict[str, Any]] = []
        for name, r in self.policies.items():
            rows.extend({"policy": name, "position": int(p), "nll": float(x)}
                        for p, x in zip(r.positions.tolist(), r.nll.tolist()))
        return rows


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Shapes: logits (N, V), targets (N,) -> (N,) NLL in nats, computed in fp32."""
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")


@torch.no_grad()
def stream_nll(model: nn.Module, ids: torch.Tensor, cache: Cache, *, name: str = "cache",
               max_positions: int | None = None, on_step: Callable[[int], None] | None = None) -> PolicyResult:
    """Feed ``ids`` one token at a time through ``model`` with ``cache``; score every next token.

    Args:
        model: a causal LM.
        ids: (T,) token ids.
        cache: the KV cache policy (fresh).
        name: policy name recorded in the result.
        max_positions: stop once the stream reaches this many tokens (the dense cache's trained context).
        on_step: called with the number of tokens done (progress bars).

    Returns:
        A :class:`PolicyResult` over positions ``1 .. min(T, max_positions) - 1``.
    """
    device = next(model.parameters()).device
    ids = ids.to(device)
    n = len(ids) if max_positions is None else min(len(ids), max_positions)
    note = f"stopped at the model's context ({max_positions} tokens)" if n < len(ids) else ""
    nll = torch.empty(max(n - 1, 0))
    meter = _MemoryMeter(device)
    t0 = time.perf_counter()
    for t in range(n - 1):
        logits = model(input_ids=ids[t:t + 1][None], use_cache=True, **cache_kwargs(model, cache)).logits[0, -1:]  # (1, V)
        nll[t] = _token_nll(logits, ids[t + 1:t + 2])[0].cpu()
        meter.sample(kv_cache_bytes(cache))
        if on_step is not None:
            on_step(t + 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return PolicyResult(name, torch.arange(1, n), nll, seconds, meter.summary(), note)


def _kv_bytes_per_token(model: nn.Module) -> int:
    a = get_adapter(model)
    itemsize = next(model.parameters()).element_size()
    return 2 * a.n_layers * a.n_kv_heads * a.d_head * itemsize


@torch.no_grad()
def recompute_nll(model: nn.Module, ids: torch.Tensor, context: int, *, batch_size: int = 16,
                  positions: Sequence[int] | None = None, on_step: Callable[[int], None] | None = None
                  ) -> PolicyResult:
    """Sliding window with re-computation: token ``t + 1`` is predicted by a fresh forward over ``ids[t-context : t+1]``.

    Batched: ``batch_size`` windows of ``context + 1`` tokens go through one forward and only the last position's
    logits are kept; the first ``context + 1`` predictions (no eviction yet) come from one forward over the prefix.
    Same numbers as one forward per token (up to kernel rounding), ~``batch_size`` times fewer calls.

    Args:
        model: a causal LM.
        ids: (T,) token ids.
        context: earlier tokens each window keeps (``n_sink + window``).
        batch_size: windows per forward.
        positions: only score these predicted positions (default: all ``1..T-1``); used by the benchmark.
        on_step: called with the number of tokens done.

    Returns:
        A :class:`PolicyResult` named ``recompute``.
    """
    device = next(model.parameters()).device
    ids = ids.to(device)
    T = len(ids)
    wanted = torch.arange(1, T) if positions is None else torch.as_tensor(list(positions), dtype=torch.long)
    if len(wanted) and (wanted.min() < 1 or wanted.max() >= T):
        raise InputError(f"positions must lie in 1..{T - 1}")
    meter = _MemoryMeter(device)
    out: dict[int, float] = {}
    t0 = time.perf_counter()
    head = wanted[wanted <= context + 1]  # predicted from a prefix shorter than a full window
    if len(head):
        end = int(head.max())
        logits = model(input_ids=ids[:end][None], use_cache=False).logits[0]  # (end, V)
        nll = _token_nll(logits[head - 1], ids[head]).cpu()
        out.update(zip(head.tolist(), nll.tolist()))
        meter.sample(end * _kv_bytes_per_token(model))
        if on_step is not None:
            on_step(len(out))
    tail = wanted[wanted > context + 1]
    for i in range(0, len(tail), batch_size):
        pos = tail[i:i + batch_size]  # predicted positions p: window ids[p-1-context : p]
        starts = (pos - 1 - context).to(device)
        idx = starts[:, None] + torch.arange(context + 1, device=device)[None]  # (B, context+1)
        logits = model(input_ids=ids[idx], use_cache=False, logits_to_keep=1).logits[:, -1]  # (B, V)
        nll = _token_nll(logits, ids[pos.to(device)]).cpu()
        out.update(zip(pos.tolist(), nll.tolist()))
        meter.sample((context + 1) * _kv_bytes_per_token(model))
        if on_step is not None:
            on_step(len(out))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    order = sorted(out)
    return PolicyResult("recompute", torch.tensor(order, dtype=torch.long),
                        torch.tensor([out[p] for p in order]), seconds, meter.summary())


def run_policy(model: nn.Module, ids: torch.Tensor, policy: str, n_sink: int, window: int, *,
               batch_size: int = 16, on_step: Callable[[int], None] | None = None) -> PolicyResult:
    """Run one named policy (see the module docstring) over the stream ``ids`` (T,)."""
    if policy == "recompute":
        return recompute_nll(model, ids, n_sink + window, batch_size=batch_size, on_step=on_step)
    cache = CACHE_POLICIES[policy](model, n_sink, window)
    max_positions = get_adapter(model).max_positions if policy == "dense" else None
    return stream_nll(model, ids, cache, name=policy, max_positions=max_positions, on_step=on_step)


def evaluate_stream(model: nn.Module, ids: torch.Tensor, *, n_sink: int = 4, window: int = 1020,
                    policies: Sequence[str] = DEFAULT_POLICIES, batch_size: int = 16,
                    on_policy: Callable[[str, int], Callable[[int], None] | None] | None = None,
                    meta: dict[str, Any] | None = None) -> StreamEval:
    """Token-by-token perplexity of one long stream under each policy (StreamingLLM Fig. 3 / Table 1 arms).

    Args:
        model: a causal LM in eval mode.
        ids: (T,) token ids of the stream (T >= 2).
        n_sink: sink tokens kept by ``sinks``.
        window: recent tokens kept by ``sinks``; ``window`` and ``recompute`` keep ``n_sink + window``.
        policies: names from :data:`ALL_POLICIES`.
        batch_size: windows per forward for ``recompute``.
        on_policy: ``on_policy(name, total_steps)`` may return an ``on_step`` progress callback.
        meta: extra fields for ``summary.json`` (model, file, ...).

    Raises:
        InputError: unknown policy, bad sizes, or a stream shorter than 2 tokens.
    """
    if ids.dim() != 1 or len(ids) < 2:
        raise InputError("the stream needs at least 2 tokens")
    if n_sink < 0 or window < 1:
        raise InputError(f"need --sinks >= 0 and --window >= 1, got {n_sink} and {window}")
    unknown = [p for p in policies if p not in ALL_POLICIES]
    if unknown or not policies:
        raise InputError(f"unknown policies {unknown}; choose from {', '.join(ALL_POLICIES)}")
    with torch.no_grad():  # warm-up: page in lazily loaded weights so they do not count as a policy's memory
        model(input_ids=ids[:2][None].to(next(model.parameters()).device), use_cache=False)
    results: dict[str, PolicyResult] = {}
    for name in dict.fromkeys(policies):
        on_step = on_policy(name, len(ids) - 1) if on_policy is not None else None
        results[name] = run_policy(model, ids, name, n_sink, window, batch_size=batch_size, on_step=on_step)
    return StreamEval(results, len(ids), n_sink, window, dict(meta or {}))


def plot_log_ppl(result: StreamEval, smooth: int = 64) -> Any:
    """Figure: log-perplexity vs position for each policy (left: running mean over ``smooth`` tokens;
    right: cumulative mean NLL). A dotted line marks where eviction starts. Data in, Figure out, no I/O."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for name, r in result.policies.items():
        if not len(r.nll):
            continue
        x = r.positions.numpy()
        y = r.nll.double()
        k = max(1, min(smooth, len(y)))
        run = torch.nn.functional.avg_pool1d(y[None, None], k, stride=1)[0, 0].numpy()
        ax1.plot(x[k - 1:], run, label=f"{name} (ppl {r.ppl:.1f})", lw=1.2)
        ax2.plot(x, (y.cumsum(0) / torch.arange(1, len(y) + 1)).numpy(), label=name, lw=1.2)
    for ax in (ax1, ax2):
        ax.axvline(result.n_sink + result.window + 1, color="grey", ls=":", lw=1)
        ax.set_xlabel("position in stream (tokens)")
        ax.grid(alpha=0.3)
    ax1.set_ylabel(f"log-perplexity (mean NLL over last {smooth} tokens, nats)")
    ax2.set_ylabel("cumulative log-perplexity (nats)")
    ax1.legend(fontsize=8)
    fig.suptitle(f"streaming: {result.n_sink} sinks + {result.window} window, {result.n_tokens} tokens")
    return fig
