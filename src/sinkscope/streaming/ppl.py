"""Token-by-token perplexity of a long stream under KV-cache policies: dense, window, sinks + window, recompute.

Each policy predicts token ``t + 1`` from token ``t`` and what its cache kept (Xiao et al. 2023, Sec. 4.1, Fig. 3):

* ``dense``: the full cache (``DynamicCache``), only up to the model's trained context.
* ``window``: the last ``n_sink + window`` tokens (same memory budget as ``sinks``), no sinks.
* ``sinks``: the first ``n_sink`` plus the last ``window`` tokens, positions re-assigned by cache slot (StreamingLLM).
* ``sinks_plain``: the same tokens, absolute positions kept (no re-assignment).
* ``recompute``: the quality reference -- for every token, re-run the model from scratch on the last
  ``n_sink + window + 1`` tokens (batched: many windows in one forward; identical results to one forward per token).

A query always sees at most ``n_sink + window`` earlier tokens plus itself under every bounded policy.

Modes. ``dense``, ``window`` and ``sinks_plain`` have a fixed attention mask, so by default (``mode="auto"``) they are
scored in blocks of ``chunk`` queries with a sinks + band mask (`sinkscope.streaming.banded`), which gives the same
NLLs as feeding one token at a time (tests check 1e-4) in ``T / chunk`` forwards; ``mode="token"`` forces one token
per forward. ``sinks`` (re-assigned positions) is always token by token; ``recompute`` is batched windows. Each
result records its ``mode``.

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
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from transformers import Cache, DynamicCache

from sinkscope.compat import cache_kwargs
from sinkscope.devices import model_device
from sinkscope.errors import InputError
from sinkscope.io import ensure_output_dir, save_figure_atomic, write_csv_atomic, write_json_atomic
from sinkscope.models.adapters import get_adapter
from sinkscope.progress import ProgressCallback
from sinkscope.registry import Registry
from sinkscope.streaming.banded import BANDED_POLICIES, banded_stream_nll, fast_mode_obstacle
from sinkscope.streaming.cache import kv_cache_bytes, sink_cache

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

#: Cache policies: name -> factory(model, n_sink, window) -> Cache. ``recompute`` is handled separately.
CACHE_POLICIES: Registry[Callable[[nn.Module, int, int], Cache]] = Registry("stream policy")
# cast: stream policies run on HF causal LMs, whose ``config`` is a PreTrainedConfig
CACHE_POLICIES.add("dense", lambda model, n_sink, window: DynamicCache(config=cast("PreTrainedConfig", model.config)))
CACHE_POLICIES.add("window", lambda model, n_sink, window: sink_cache(model, 0, n_sink + window))
CACHE_POLICIES.add("sinks", lambda model, n_sink, window: sink_cache(model, n_sink, window, reassign=True))
CACHE_POLICIES.add("sinks_plain", lambda model, n_sink, window: sink_cache(model, n_sink, window, reassign=False))

#: Every policy name, in report order; DEFAULT_POLICIES is what ``sinkscope stream eval`` runs by default.
ALL_POLICIES: tuple[str, ...] = ("dense", "window", "sinks", "sinks_plain", "recompute")
DEFAULT_POLICIES: tuple[str, ...] = ("dense", "window", "sinks", "recompute")
#: ``auto``: block scoring where it is exact (BANDED_POLICIES), else one token per forward; ``token``: always one
MODES: tuple[str, ...] = ("auto", "token")
#: (n_sink, window) of each banded policy's attention mask, from the run's (n_sink, window); window None: causal
_BANDS: dict[str, Callable[[int, int], tuple[int, int | None]]] = {
    "dense": lambda s, w: (0, None), "window": lambda s, w: (0, s + w), "sinks_plain": lambda s, w: (s, w)}



@dataclass(frozen=True)
class StreamOptions:
    """How `evaluate_stream` runs, checked once when built (before any model loads).

    Attributes:
        n_sink: first tokens kept by ``sinks`` (>= 0); window: recent tokens kept (>= 1).
        policies: names from `ALL_POLICIES` (each once, in the order given).
        batch_size: windows per forward for ``recompute`` (>= 1).
        mode: ``auto`` (exact blocks for the fixed-mask policies) or ``token`` (one token per forward).
        chunk: queries per forward in the block mode (>= 1).

    Raises:
        InputError: a value outside its range, an unknown policy or mode (one line naming the option).
    """

    n_sink: int = 4
    window: int = 1020
    policies: tuple[str, ...] = DEFAULT_POLICIES
    batch_size: int = 16
    mode: str = "auto"
    chunk: int = 512

    def __post_init__(self) -> None:
        if self.n_sink < 0:
            raise InputError(f"n_sink must be >= 0, got {self.n_sink}", param="n_sink")
        if self.window < 1:
            raise InputError(f"window must be >= 1, got {self.window}", param="window")
        policies = tuple(dict.fromkeys(self.policies))
        unknown = [p for p in policies if p not in ALL_POLICIES]
        if unknown or not policies:
            raise InputError(f"unknown policies {','.join(unknown) or '(none given)'}; choose from "
                             f"{','.join(ALL_POLICIES)}", param="policies")
        object.__setattr__(self, "policies", policies)
        if self.mode not in MODES:
            raise InputError(f"unknown mode {self.mode!r}; choose from {', '.join(MODES)}")
        if self.chunk < 1:
            raise InputError(f"chunk must be >= 1, got {self.chunk}", param="chunk")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}", param="batch_size")

    def check_length(self, n_tokens: int) -> None:
        """Refuse a stream the cache never evicts from (the policies could not differ), or under 2 tokens."""
        if n_tokens < 2:
            raise InputError(f"tokens must be at least 2, got {n_tokens}", param="n_tokens")
        if n_tokens <= self.n_sink + self.window + 1:
            raise InputError(f"tokens {n_tokens} <= n_sink + window + 1 = {self.n_sink + self.window + 1}: the "
                             "cache never evicts, so the policies cannot differ; give more tokens or a smaller "
                             "window", param="n_tokens")


_MB = float(1 << 20)
_SAMPLE_EVERY = 16  # token-by-token runs sample memory every this many steps (and at the last)


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
        note: why the run stopped early, if it did (e.g. past the model's context), or why it ran token by token.
        mode: ``token`` (one token per forward), ``fast`` (exact blocks with a band mask) or ``batched windows``.
    """

    name: str
    positions: torch.Tensor
    nll: torch.Tensor
    seconds: float
    memory: dict[str, float]
    note: str = ""
    mode: str = "token"

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
                "seconds": self.seconds, "mode": self.mode, **self.memory,
                **({"note": self.note} if self.note else {})}


@dataclass(frozen=True)
class StreamEval:
    """All policies' results on one stream. ``to_json()`` is ``summary.json``; ``to_rows()`` the per-token CSV."""

    policies: dict[str, PolicyResult]
    n_tokens: int
    n_sink: int
    window: int
    meta: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None

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
            **({"total_seconds": self.seconds} if self.seconds is not None else {}),
        }

    def save(self, directory: str | Path) -> list[Path]:
        """Write ``tokens.csv`` (`to_rows`), ``summary.json`` (`to_json`) and ``log_ppl.png`` into ``directory``
        (created), each file atomically; returns the paths written."""
        from sinkscope.viz.streaming import log_ppl_figure

        d = ensure_output_dir(directory)
        write_csv_atomic(d / "tokens.csv", self.to_rows())
        write_json_atomic(d / "summary.json", self.to_json())
        save_figure_atomic(d / "log_ppl.png", log_ppl_figure(self))
        return [d / "tokens.csv", d / "summary.json", d / "log_ppl.png"]

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
    device = model_device(model)
    ids = ids.to(device)
    n, note = _stop_at_context(len(ids), max_positions)
    nll = torch.empty(max(n - 1, 0), device=device)
    meter = _MemoryMeter(device)
    kw = cache_kwargs(model, cache)
    inputs = ids[:n - 1, None, None]  # (n-1, 1, 1): one (1, 1) input per step, no per-step slicing
    t0 = time.perf_counter()
    for t in range(n - 1):
        logits = model(input_ids=inputs[t], use_cache=True, **kw).logits[0]  # (1, V)
        nll[t:t + 1] = _token_nll(logits, ids[t + 1:t + 2])  # stays on the device: no sync per token
        if t % _SAMPLE_EVERY == 0 or t == n - 2:
            meter.sample(kv_cache_bytes(cache))
        if on_step is not None:
            on_step(t + 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return PolicyResult(name, torch.arange(1, n), nll.cpu(), seconds, meter.summary(), note)


def _stop_at_context(n_tokens: int, max_positions: int | None) -> tuple[int, str]:
    """(tokens to use, note): a stream longer than ``max_positions`` is cut there."""
    if max_positions is None or n_tokens <= max_positions:
        return n_tokens, ""
    return max_positions, f"stopped at the model's context ({max_positions} tokens)"


@torch.no_grad()
def banded_nll(model: nn.Module, ids: torch.Tensor, policy: str, n_sink: int, window: int, *, chunk: int = 512,
               on_step: Callable[[int], None] | None = None) -> PolicyResult:
    """Score a fixed-mask policy (``dense``, ``window``, ``sinks_plain``) in exact blocks of ``chunk`` queries.

    Same NLLs as :func:`stream_nll` with the policy's cache (see `sinkscope.streaming.banded`). ``peak_mem_mb`` is
    the K/V one block attends over: the cache plus the block (``n_sink + window + chunk`` tokens for the bounded
    policies). ``dense`` stops at the model's context.
    """
    if policy not in _BANDS:
        raise InputError(f"policy {policy!r} has no fixed mask; banded policies: {', '.join(BANDED_POLICIES)}")
    if chunk < 1:
        raise InputError(f"chunk must be >= 1, got {chunk}")
    device = model_device(model)
    ids = ids.to(device)
    n, note = _stop_at_context(len(ids), get_adapter(model).max_positions if policy == "dense" else None)
    band_sink, band_window = _BANDS[policy](n_sink, window)
    cache = CACHE_POLICIES[policy](model, n_sink, window)
    per_token = _kv_bytes_per_token(model)
    meter = _MemoryMeter(device)

    def on_chunk(done: int, kv_tokens: int) -> None:
        meter.sample(kv_tokens * per_token)
        if on_step is not None:
            on_step(done)

    t0 = time.perf_counter()
    nll = banded_stream_nll(model, ids[:n], cache, n_sink=band_sink, window=band_window, chunk=chunk,
                            on_chunk=on_chunk)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return PolicyResult(policy, torch.arange(1, n), nll, seconds, meter.summary(), note, mode="fast")


def _kv_bytes_per_token(model: nn.Module) -> int:
    a = get_adapter(model)
    itemsize = next(model.parameters()).element_size()
    return 2 * a.n_layers * a.n_kv_heads * a.d_head * itemsize


@torch.no_grad()
def recompute_nll(model: nn.Module, ids: torch.Tensor, context: int, *, batch_size: int = 16,
                  positions: Sequence[int] | None = None, on_step: Callable[[int], None] | None = None
                  ) -> PolicyResult:
    """Sliding window with re-computation: token ``t + 1`` is predicted by a fresh forward over ``ids[t-context :
    t+1]``.

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
    device = model_device(model)
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
                        torch.tensor([out[p] for p in order]), seconds, meter.summary(), mode="batched windows")


def run_policy(model: nn.Module, ids: torch.Tensor, policy: str, n_sink: int, window: int, *,
               batch_size: int = 16, mode: str = "auto", chunk: int = 512,
               on_step: Callable[[int], None] | None = None) -> PolicyResult:
    """Run one named policy (see the module docstring) over the stream ``ids`` (T,).

    ``mode="auto"`` scores the fixed-mask policies in exact blocks of ``chunk`` queries (falling back to one token
    per forward, with a note, where :func:`~sinkscope.streaming.banded.fast_mode_obstacle` says blocks would not be
    exact); ``mode="token"`` always feeds one token per forward."""
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if policy == "recompute":
        return recompute_nll(model, ids, n_sink + window, batch_size=batch_size, on_step=on_step)
    note = ""
    if mode == "auto" and policy in BANDED_POLICIES:
        obstacle = fast_mode_obstacle(model)
        if obstacle is None:
            return banded_nll(model, ids, policy, n_sink, window, chunk=chunk, on_step=on_step)
        note = f"token by token: {obstacle}"
    cache = CACHE_POLICIES[policy](model, n_sink, window)
    max_positions = get_adapter(model).max_positions if policy == "dense" else None
    r = stream_nll(model, ids, cache, name=policy, max_positions=max_positions, on_step=on_step)
    return r if not note else PolicyResult(r.name, r.positions, r.nll, r.seconds, r.memory,
                                           "; ".join(x for x in (r.note, note) if x), r.mode)


def has_rope(model: nn.Module) -> bool:
    """Whether the model encodes positions with RoPE (a module with an ``inv_freq`` buffer)."""
    return any(isinstance(getattr(m, "inv_freq", None), torch.Tensor) for m in model.modules())


def check_stream(model: nn.Module, n_tokens: int, n_sink: int, window: int, policies: Sequence[str]) -> None:
    """Refuse, in one line, runs that cannot mean what they say (InputError).

    * ``n_sink + window + 1`` past the model's context: every bounded policy (and ``recompute``'s windows) would
      attend over more tokens than the model was trained on;
    * a model with learned absolute positions (no RoPE) has no position past its context: ``window`` and
      ``sinks_plain`` keep absolute positions, so they cannot score a longer stream (``dense`` stops at the
      context by design).
    """
    ctx = get_adapter(model).max_positions
    if not ctx:
        return
    if n_sink + window + 1 > ctx and any(p != "dense" for p in policies):
        raise InputError(f"--sinks + --window + 1 = {n_sink + window + 1} tokens exceed the model's context ({ctx}): "
                         "the bounded policies would attend past the trained positions; use a smaller --window")
    absolute = [p for p in policies if p in ("window", "sinks_plain")]
    if n_tokens > ctx and absolute and not has_rope(model):
        raise InputError(f"{type(model).__name__} has learned absolute positions (no RoPE): {', '.join(absolute)} "
                         f"cannot score past its context ({ctx} tokens); use --tokens {ctx} or fewer")


def evaluate_stream(model: nn.Module, ids: torch.Tensor, *, n_sink: int = 4, window: int = 1020,
                    policies: Sequence[str] = DEFAULT_POLICIES, batch_size: int = 16, mode: str = "auto",
                    chunk: int = 512, progress: ProgressCallback | None = None,
                    meta: dict[str, Any] | None = None) -> StreamEval:
    """Token-by-token perplexity of one long stream under each policy (StreamingLLM Fig. 3 / Table 1 arms).

    Args:
        model: a causal LM in eval mode.
        ids: (T,) token ids of the stream (T >= 2).
        n_sink: sink tokens kept by ``sinks``.
        window: recent tokens kept by ``sinks``; ``window`` and ``recompute`` keep ``n_sink + window``.
        policies: names from :data:`ALL_POLICIES`.
        batch_size: windows per forward for ``recompute``.
        mode: ``auto`` (exact blocks for the fixed-mask policies) or ``token`` (one token per forward).
        chunk: queries per forward in the block mode.
        progress: ``progress(done, total, policy)``: tokens scored by the policy running now, of ``T - 1``.
        meta: extra fields for ``summary.json`` (model, file, ...).

    Raises:
        InputError: unknown policy or mode, bad sizes, a stream shorter than 2 tokens, or a run
            :func:`check_stream` refuses.
    """
    t0 = time.perf_counter()
    if ids.dim() != 1 or len(ids) < 2:
        raise InputError("the stream needs at least 2 tokens")
    opts = StreamOptions(n_sink, window, tuple(policies), batch_size, mode, chunk)
    check_stream(model, len(ids), n_sink, window, opts.policies)
    with torch.no_grad():  # warm-up: page in lazily loaded weights so they do not count as a policy's memory
        model(input_ids=ids[:2][None].to(model_device(model)), use_cache=False)
    results: dict[str, PolicyResult] = {}
    for name in opts.policies:
        on_step = (lambda done, n=name: progress(done, len(ids) - 1, n)) if progress is not None else None
        if on_step is not None:
            on_step(0)  # the policy starts now (its rate and time left count from here)
        results[name] = run_policy(model, ids, name, n_sink, window, batch_size=batch_size, mode=mode, chunk=chunk,
                                   on_step=on_step)
    return StreamEval(results, len(ids), n_sink, window, dict(meta or {}), time.perf_counter() - t0)
