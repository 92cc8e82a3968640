"""`sinkscope kv eval`: KV-cache methods side by side on the EVAL suite (`sinkscope.kv.suite`) at equal bytes.

A **method** is a way to hold the KV cache: a `Method` makes a fresh cache for each item and prefills the item's
context into it (in chunks; a peer such as kvpress compresses once at the end of its own prefill). Everything
after the context -- the question, greedy decoding, the scored tail of a stream -- is fed the same way for every
method, through ``model(...)`` with the method's cache. Built-in methods (`METHODS`, by name):

* ``dense``: transformers' ``DynamicCache`` (the reference; one row per length, no budget).
* ``uniform``: every kv head keeps ``n_sink`` sinks + a window sized so the bytes at the item's length are the
  budget (`sinkscope.kv.policy.window_for_budget`): StreamingLLM at equal bytes.
* ``policy``: the calibrated policy re-cut at each budget from its head scores (`KVPolicy.from_scores`: the kv
  heads with the most distant attention mass keep the full cache, the rest keep the policy's sinks + window).
* ``random``: as many full-cache heads as the budget buys, chosen at random (one row per seed): the control that
  shows the measurement matters.

Every non-dense method stores its cache in `sinkscope.kv.cache.headwise_cache` (real, smaller tensors).

Per item (`sinkscope.kv.suite.Item`) one **cell** is measured and appended to ``cells.jsonl`` (resumable: a cell
whose key -- method, budget, seed, item and a fingerprint of every setting -- is already there is skipped):

* retrieval (``passkey``, ``multikey``): prefill the context, feed the question, decode ``answer_tokens`` greedy
  tokens; ``correct`` when the first number is the key.
* streams (``prose``, ``code``): prefill ``context_len`` tokens, feed the tail in one forward; per scored token the
  KL(dense || method) in nats and the NLL of the true next token (perplexity ``exp(mean NLL)``).
* ``agree``: prefill the prompt, decode ``agree_tokens`` greedy tokens; ``agreement`` is the fraction of positions
  where the token equals the dense model's.

Each cell also records ``kv_bytes`` (bytes of the key/value tensors the cache really stores after the prompt; for
a cache that masks instead of shrinking, its full size), ``peak_rss_mb`` (the process's resident-set high-water
mark above its level at the cell's start, Linux ``VmHWM`` after a reset, else a 16-step sample) and, where it
decodes, ``decode_s_per_token`` (wall seconds per greedy step after the prompt).

`summarize` turns cells into one row per (method, budget, length) -- random averaged over its seeds -- and
`KVEvalResult.save` writes ``summary.json``, ``summary.csv``, ``summary.md`` and the figure it is handed
(`sinkscope.viz.kv.plot_quality_vs_bytes`; the viz layer sits above this one, so the caller passes it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Cache, DynamicCache

from sinkscope.compat import cache_kwargs
from sinkscope.errors import InputError
from sinkscope.io import append_jsonl, read_jsonl, save_figure_atomic, write_atomic, write_csv_atomic, write_json_atomic
from sinkscope.kv.suite import RETRIEVAL_TASKS, STREAM_TASKS, Item, Suite, answer_correct
from sinkscope.progress import ProgressCallback
from sinkscope.registry import Registry

CELLS_FILE = "cells.jsonl"
FIGURE_FILE = "kv_quality.png"
#: the methods `sinkscope kv eval` runs by default, in table order
DEFAULT_METHODS: tuple[str, ...] = ("dense", "uniform", "policy", "random")
DEFAULT_BUDGETS: tuple[float, ...] = (0.125, 0.25, 0.5)
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2)
_MB = float(1 << 20)


# ---- memory -----------------------------------------------------------------------------------------------------
def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class PeakRSS:
    """The process's resident-set high-water mark over a block of work, above its level at the start (bytes).

    On Linux the kernel's peak (``VmHWM``) is reset at the start (``/proc/self/clear_refs``), so the peak is exact
    for the block; elsewhere it is 0 (unknown). Allocator caching makes it noisy on the CPU: compare methods in
    one process, in the same order.
    """

    def __init__(self) -> None:
        self.start = 0
        self.exact = False

    def __enter__(self) -> PeakRSS:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.exact = True
        except OSError:
            self.exact = False
        self.start = (_status_kb("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    @property
    def delta(self) -> int:
        if not self.exact:
            return 0
        return max(0, (_status_kb("VmHWM") or 0) * 1024 - self.start)


def stored_bytes(cache: Cache | None) -> int:
    """Bytes of the key/value tensors ``cache`` really stores: its own ``stored_bytes()`` where it has one (the
    head-wise cache), else every layer's ``keys``/``values`` tensors (a cache that masks counts in full)."""
    if cache is None:
        return 0
    own = getattr(cache, "stored_bytes", None)
    if callable(own):
        return int(own())
    total = 0
    for layer in getattr(cache, "layers", ()):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


# ---- methods ----------------------------------------------------------------------------------------------------
def chunked_prefill(model: nn.Module, ids: Tensor, cache: Cache, chunk: int) -> Tensor:
    """Feed ``ids`` (1, T) into ``cache`` in forwards of at most ``chunk`` tokens; returns the last position's
    logits (V,) in float32."""
    logits = None
    for s in range(0, ids.shape[1], chunk):
        out = model(input_ids=ids[:, s:s + chunk], use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
        logits = out.logits[0, -1]
    assert logits is not None, "empty prefill"
    return logits.float()


@dataclass
class Method:
    """One way of holding the KV cache, at one budget (and seed).

    Attributes:
        name: the method's name (``dense``, ``uniform``, ``policy``, ``random``, ``kvpress:snapkv`` ...).
        budget: the target fraction of the dense cache's bytes at the item's length (None: dense).
        seed: the random control's seed (None otherwise).
        new_cache: ``(model, length) -> Cache``: a fresh, empty cache for an item of ``length`` tokens.
        prefill: ``(model, ids (1, T), cache) -> last logits (V,)``: feed the context (default: `chunked_prefill`
            with the run's chunk). A method that compresses once after the context (kvpress) does it here.
        next_position: ``(cache, context_len) -> int``: the RoPE position of the first token after the context
            (default: ``context_len``, absolute positions; a press that re-rotates kept keys to consecutive slots
            continues from the cache's length). Every later token is fed with explicit ``position_ids``.
        info: what the row should record about the method (its policy's heads, the press's settings...).
        policy_for: ``length -> KVPolicy`` for the head-wise methods (the policy their cache follows at that length;
            its full-head count goes into each cell), else None.
    """

    name: str
    budget: float | None
    seed: int | None
    new_cache: Callable[[nn.Module, int], Cache]
    prefill: Callable[[nn.Module, Tensor, Cache], Tensor] | None = None
    next_position: Callable[[Cache, int], int] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    policy_for: Callable[[int], Any] | None = None

    def run_prefill(self, model: nn.Module, ids: Tensor, cache: Cache, chunk: int) -> tuple[Tensor, int]:
        """Prefill the context ``ids`` (1, T); returns the last logits (V,) and the position of the next token."""
        logits = (self.prefill or (lambda m, x, k: chunked_prefill(m, x, k, chunk)))(model, ids, cache)
        pos = self.next_position(cache, ids.shape[1]) if self.next_position is not None else ids.shape[1]
        return logits, pos

    @property
    def label(self) -> str:
        parts = [self.name]
        if self.budget is not None:
            parts.append(f"b{self.budget:g}")
        if self.seed is not None:
            parts.append(f"s{self.seed}")
        return "/".join(parts)


@dataclass(frozen=True)
class MethodContext:
    """What a method builder may use: the policy (None without one), the run's budgets and seeds, and the
    sinks of the uniform baseline."""

    policy: Any
    budgets: tuple[float, ...]
    seeds: tuple[int, ...]
    n_sink: int


#: name -> builder(model, context) -> the methods to run (one per budget and seed)
METHODS: Registry[Callable[[nn.Module, MethodContext], list[Method]]] = Registry("KV-cache method")


def _dense(model: nn.Module, ctx: MethodContext) -> list[Method]:
    return [Method("dense", None, None, lambda m, length: DynamicCache(config=m.config))]


def _headwise(name: str, budget: float, seed: int | None, policy_at: Callable[[int], Any],
              info: dict[str, Any]) -> Method:
    """A method whose cache is `sinkscope.kv.cache.headwise_cache` of the policy ``policy_at(length)``."""

    def new_cache(model: nn.Module, length: int) -> Cache:
        from sinkscope.kv.cache import headwise_cache

        return headwise_cache(model, policy_at(length))

    return Method(name, budget, seed, new_cache, info=info, policy_for=policy_at)


def _uniform(model: nn.Module, ctx: MethodContext) -> list[Method]:
    from sinkscope.kv.policy import KVPolicy, window_for_budget

    def at(budget: float) -> Callable[[int], Any]:
        return lambda length: KVPolicy.uniform(model, ctx.n_sink, window_for_budget(budget, ctx.n_sink, length),
                                               length)

    return [_headwise("uniform", b, None, at(b), {"n_sink": ctx.n_sink}) for b in ctx.budgets]


def _require_policy(ctx: MethodContext, name: str) -> Any:
    if ctx.policy is None:
        raise InputError(f"method {name!r} needs a calibrated policy (--policy DIR)", param="policy")
    return ctx.policy


def policy_at_budget(policy: Any, budget: float, length: int) -> Any:
    """The policy re-cut for ``budget`` at ``length`` tokens from its head scores (its sinks and window kept)."""
    from sinkscope.kv.policy import KVPolicy

    scores = policy.scores_array()
    if scores is None:
        raise InputError("the policy has no head scores to re-cut at other budgets (calibrate it with "
                         "sinkscope kv calibrate)", param="policy")
    return KVPolicy.from_scores(scores, budget, policy.n_sink, policy.window, length, model=policy.model,
                                criterion=policy.info.get("criterion_column"), kind="calibrated",
                                info={"recut_from": policy.budget})


def _policy(model: nn.Module, ctx: MethodContext) -> list[Method]:
    policy = _require_policy(ctx, "policy")
    policy.check_model(model)
    return [_headwise("policy", b, None, lambda length, b=b: policy_at_budget(policy, b, length),
                      {"n_sink": policy.n_sink, "window": policy.window}) for b in ctx.budgets]


def _random(model: nn.Module, ctx: MethodContext) -> list[Method]:
    from sinkscope.kv.policy import KVPolicy

    policy = _require_policy(ctx, "random")
    return [_headwise("random", b, s, lambda length, b=b, s=s: KVPolicy.random(
        model, b, policy.n_sink, policy.window, length, seed=s), {"n_sink": policy.n_sink, "window": policy.window})
        for b in ctx.budgets for s in ctx.seeds]


METHODS.add("dense", _dense)
METHODS.add("uniform", _uniform)
METHODS.add("policy", _policy)
METHODS.add("random", _random)


def build_methods(model: nn.Module, names: Sequence[str], ctx: MethodContext) -> list[Method]:
    """The methods named (registry `METHODS`), each at every budget (and seed)."""
    out: list[Method] = []
    for name in names:
        out += METHODS[name](model, ctx)
    return out


# ---- options and cells ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalOptions:
    """How every cell is measured (validated once, before any model loads).

    Attributes:
        chunk: prefill tokens per forward.
        answer_tokens: greedy tokens decoded after a retrieval question.
        agree_tokens: greedy tokens compared on the ``agree`` prompts.
    """

    chunk: int = 256
    answer_tokens: int = 7
    agree_tokens: int = 16

    def __post_init__(self) -> None:
        if self.chunk < 1:
            raise InputError(f"chunk must be >= 1, got {self.chunk}", param="chunk")
        if self.answer_tokens < 5:
            raise InputError(f"answer_tokens must be >= 5 (a 5-digit key), got {self.answer_tokens}")
        if self.agree_tokens < 1:
            raise InputError(f"agree_tokens must be >= 1, got {self.agree_tokens}")


def fingerprint(settings: dict[str, Any]) -> str:
    """A short hash of every setting a cell depends on (model, suite spec, options, policy): cells of another
    fingerprint in the same ``cells.jsonl`` are never reused."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def cell_key(method: Method, item: Item, fp: str) -> str:
    return f"{method.label}|{item.key}|{fp}"


def _feed(model: nn.Module, ids: Tensor, cache: Cache, position: int, logits_to_keep: int = 0) -> Tensor:
    """One forward of ``ids`` (1, n) after what ``cache`` holds, at positions ``position ..``; logits (n', V)."""
    pos = torch.arange(position, position + ids.shape[1], device=ids.device)[None]
    out = model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=logits_to_keep,
                **cache_kwargs(model, cache))
    return out.logits[0].float()


@torch.no_grad()
def _greedy(model: nn.Module, cache: Cache, first_logits: Tensor, n: int, position: int) -> tuple[list[int], float]:
    """Greedy tokens from ``first_logits`` on, feeding each back through ``cache`` (the first at ``position``);
    seconds per decode step."""
    device = first_logits.device
    tokens = [int(first_logits.argmax())]
    t0 = time.perf_counter()
    for i in range(n - 1):
        logits = _feed(model, torch.tensor([[tokens[-1]]], device=device), cache, position + i, 1)
        tokens.append(int(logits[-1].argmax()))
    steps = n - 1
    return tokens, (time.perf_counter() - t0) / steps if steps else float("nan")


def _device(model: nn.Module) -> torch.device:
    from sinkscope.devices import model_device

    return model_device(model)


@torch.no_grad()
def stream_logits(model: nn.Module, method: Method, item: Item, chunk: int) -> tuple[Tensor, int]:
    """The method's next-token log-probabilities on the scored tail of a stream, (S, V) float32, S = length -
    context_len, predicting ``ids[context_len:]``; and the cache's stored bytes at the end."""
    ids = torch.tensor([item.ids], device=_device(model))
    c = item.context_len
    cache = method.new_cache(model, item.length)
    first, pos = method.run_prefill(model, ids[:, :c], cache, chunk)
    logits = torch.cat([first[None], _feed(model, ids[:, c:-1], cache, pos)], dim=0)
    return torch.log_softmax(logits, dim=-1), stored_bytes(cache)


@torch.no_grad()
def measure_cell(model: nn.Module, tokenizer: Any, method: Method, item: Item, options: EvalOptions, *,
                 dense_logprobs: Tensor | None = None, dense_tokens: Sequence[int] | None = None) -> dict[str, Any]:
    """One (method, item) cell: the row appended to ``cells.jsonl`` (without its key and settings).

    Args:
        dense_logprobs: the dense model's log-probabilities on a stream's scored tail (streams, non-dense methods).
        dense_tokens: the dense model's greedy tokens on an ``agree`` prompt (non-dense methods).
    """
    item_json = item.to_json()
    item_json["item_seed"] = item_json.pop("seed")
    row: dict[str, Any] = {**item_json, "method": method.name, "budget": method.budget, "seed": method.seed}
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        if item.task in STREAM_TASKS:
            logprobs, kv = stream_logits(model, method, item, options.chunk)
            targets = torch.tensor(item.ids[item.context_len:], device=logprobs.device)
            nll = -logprobs.gather(1, targets[:, None])[:, 0]
            row["nll"] = float(nll.mean())
            row["ppl"] = math.exp(row["nll"])
            if dense_logprobs is not None:
                kl = (dense_logprobs.exp() * (dense_logprobs - logprobs)).sum(-1)
                row["kl"] = float(kl.mean())
                row["kl_max"] = float(kl.max())
            elif method.name == "dense":
                row["kl"] = 0.0
            row["kv_bytes"] = kv
            row["_logprobs"] = logprobs  # kept in memory for the dense reference, never written
        else:
            ids = torch.tensor([item.ids], device=_device(model))
            cache = method.new_cache(model, item.length)
            c = item.context_len
            logits, pos = method.run_prefill(model, ids[:, :c], cache, options.chunk)
            if c < item.length:  # the question, fed like any later token
                logits = _feed(model, ids[:, c:], cache, pos, 1)[-1]
                pos += item.length - c
            row["kv_bytes"] = stored_bytes(cache)
            n = options.answer_tokens if item.task in RETRIEVAL_TASKS else options.agree_tokens
            tokens, per_step = _greedy(model, cache, logits, n, pos)
            row["generated"] = tokens
            row["decode_s_per_token"] = per_step
            if item.task in RETRIEVAL_TASKS:
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                row["continuation"] = text
                row["correct"] = answer_correct(text, item.answer)
            elif dense_tokens is not None:
                row["agreement"] = sum(a == b for a, b in zip(tokens, dense_tokens)) / len(dense_tokens)
            elif method.name == "dense":
                row["agreement"] = 1.0
        row["seconds"] = time.perf_counter() - t0
    row["peak_rss_mb"] = rss.delta / _MB
    if method.policy_for is not None:
        p = method.policy_for(item.length)
        row["n_full_heads"] = p.n_full
        row["window"] = p.window
        row["full_heads"] = [list(h) for h in p.full_heads]
    return row


@dataclass
class KVEvalResult:
    """The cells of one run (``cells.jsonl`` rows of this run's fingerprint) and the settings they were made with."""

    cells: list[dict[str, Any]]
    settings: dict[str, Any]

    def summary(self) -> list[dict[str, Any]]:
        return summarize(self.cells)

    def save(self, directory: str | Path, plot: Callable[[list[dict[str, Any]]], Any] | None = None) -> Path:
        """Write ``summary.json`` (settings + rows), ``summary.csv``, ``summary.md`` and, given ``plot`` (rows ->
        matplotlib Figure: `sinkscope.viz.kv.plot_quality_vs_bytes`, a layer above this one), ``kv_quality.png``."""
        d = Path(directory)
        rows = self.summary()
        write_json_atomic(d / "summary.json", {"settings": self.settings, "rows": rows})
        write_csv_atomic(d / "summary.csv", rows)
        write_atomic(d / "summary.md", summary_markdown(rows) + "\n")
        if plot is not None:
            save_figure_atomic(d / FIGURE_FILE, plot(rows))
        return d


def evaluate(model: nn.Module, tokenizer: Any, suite: Suite, methods: Sequence[Method], out: str | Path,
             options: EvalOptions | None = None, *, settings: dict[str, Any] | None = None,
             progress: ProgressCallback | None = None) -> KVEvalResult:
    """Measure every (method, item) cell not yet in ``out/cells.jsonl``; return all cells of this fingerprint there
    (so a run that adds a budget or a method summarises with the earlier ones).

    Cells are appended one at a time (a killed run resumes where it stopped); the caller holds the output
    directory's lock (`sinkscope.io.OutputLock`). The dense method, if given, runs first: the others' KL and
    agreement are measured against it (a dense reference is recomputed in memory when a resumed run needs it).

    Args:
        settings: what the cells depend on besides the options and the suite (model, policy...); hashed into
            every cell's key (`fingerprint`) and saved in the summary.
    """
    options = options or EvalOptions()
    out = Path(out)
    settings = {**(settings or {}), "suite": asdict(suite.spec), "options": asdict(options)}
    fp = fingerprint(settings)
    settings["fingerprint"] = fp
    path = out / CELLS_FILE
    rows = read_jsonl(path)  # a killed run's torn last line is dropped here and cut off by the next append
    done = {r["cell"]: r for r in rows if r.get("fingerprint") == fp}
    ordered = sorted(methods, key=lambda m: m.name != "dense")
    dense = next((m for m in ordered if m.name == "dense"), None)
    dense_cache: dict[str, Any] = {}

    def dense_reference(item: Item) -> tuple[Tensor | None, list[int] | None]:
        if dense is None:
            return None, None
        if item.task in STREAM_TASKS:
            if item.key not in dense_cache:
                dense_cache[item.key] = stream_logits(model, dense, item, options.chunk)[0]
            return dense_cache[item.key], None
        if item.task == "agree":
            row = done.get(cell_key(dense, item, fp))
            return None, (row or {}).get("generated")
        return None, None

    cells = [(m, it) for m in ordered for it in suite.items]
    total = len(cells)
    pending = [it for m, it in cells if cell_key(m, it, fp) not in done]
    if pending:  # warm up (allocator, kernels) so that the first measured cell's memory and time are not outliers
        with torch.no_grad():
            chunked_prefill(model, torch.tensor([pending[0].ids], device=_device(model)),
                            DynamicCache(config=model.config), options.chunk)
    for i, (method, item) in enumerate(cells):
        key = cell_key(method, item, fp)
        if key not in done:
            ref_lp, ref_tokens = (None, None) if method is dense else dense_reference(item)
            row = measure_cell(model, tokenizer, method, item, options, dense_logprobs=ref_lp,
                               dense_tokens=ref_tokens)
            logprobs = row.pop("_logprobs", None)
            if method is dense and logprobs is not None:
                dense_cache[item.key] = logprobs
            if method.name != "dense" and method.budget is not None:
                row["bytes_fraction_target"] = method.budget
            row.update({"cell": key, "fingerprint": fp, "label": method.label, "info": method.info})
            append_jsonl(path, row)
            done[key] = row
        if progress is not None:
            progress(i + 1, total, f"{method.label} {item.key}")
    # every cell of this fingerprint in the file: earlier runs' methods, budgets and seeds count too
    return KVEvalResult(_with_fractions(list(done.values())), settings)


def _with_fractions(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each cell's ``bytes_fraction``: its stored bytes over the dense cell's on the same item."""
    dense = {c["key"]: c.get("kv_bytes") for c in cells if c["method"] == "dense"}
    out = []
    for c in cells:
        c = dict(c)
        ref = dense.get(c["key"])
        c["bytes_fraction"] = c["kv_bytes"] / ref if ref else None
        out.append(c)
    return out


# ---- summary ----------------------------------------------------------------------------------------------------
#: summary columns: (column, source field, tasks, aggregation)
_SUMMARY_FIELDS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("passkey_acc", "correct", ("passkey",)),
    ("multikey_acc", "correct", ("multikey",)),
    ("prose_kl", "kl", ("prose",)),
    ("code_kl", "kl", ("code",)),
    ("stream_kl", "kl", STREAM_TASKS),
    ("prose_ppl", "ppl", ("prose",)),
    ("code_ppl", "ppl", ("code",)),
    ("agreement", "agreement", ("agree",)),
)


def _mean(xs: Iterable[Any]) -> float | None:
    vals = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(vals) / len(vals) if vals else None


def summarize(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, budget, length): accuracies, mean KL (nats/token over the scored tails), perplexity,
    greedy agreement, mean stored KV bytes and their fraction of dense, max peak RSS delta, mean decode seconds
    per token. Seeds (random) are averaged; ``n_seeds`` says over how many; ``passkey_acc_min/max`` give the
    spread over seeds."""
    groups: dict[tuple[str, float | None, int], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["method"], c["budget"], c["length"]), []).append(c)
    order = {m: i for i, m in enumerate(DEFAULT_METHODS)}
    rows = []
    for (name, budget, length), cs in sorted(groups.items(), key=lambda kv: (
            kv[0][2], kv[0][1] if kv[0][1] is not None else -1.0, order.get(kv[0][0], len(order)), kv[0][0])):
        seeds = sorted({c["seed"] for c in cs if c["seed"] is not None})
        row: dict[str, Any] = {"method": name, "budget": budget, "length": length, "n_seeds": len(seeds) or 1}
        for col, src, tasks in _SUMMARY_FIELDS:
            sel = [c for c in cs if c["task"] in tasks and c.get(src) is not None]
            row[col] = _mean(c[src] for c in sel)
            row[f"n_{col}"] = len(sel) // (len(seeds) or 1)
        per_seed = [_mean(c["correct"] for c in cs if c["seed"] == s and c["task"] == "passkey") for s in seeds]
        per_seed = [x for x in per_seed if x is not None]
        row["passkey_acc_min"] = min(per_seed) if per_seed else None  # every row has every column (CSV)
        row["passkey_acc_max"] = max(per_seed) if per_seed else None
        row["kv_bytes"] = _mean(c["kv_bytes"] for c in cs)
        row["bytes_fraction"] = _mean(c.get("bytes_fraction") for c in cs)
        row["peak_rss_mb"] = max((c["peak_rss_mb"] for c in cs if c.get("peak_rss_mb") is not None), default=None)
        row["decode_s_per_token"] = _mean(c.get("decode_s_per_token") for c in cs)
        notes = sorted({c["info"]["note"] for c in cs if isinstance(c.get("info"), dict) and c["info"].get("note")})
        row["note"] = "; ".join(notes)
        rows.append(row)
    return rows


def _fmt(x: Any, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return format(x, spec)


#: the markdown table's columns: (header, summary field, format)
TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("method", "method", ""), ("budget", "budget", "g"), ("tokens", "length", "d"),
    ("KV bytes / dense", "bytes_fraction", ".3f"), ("passkey acc", "passkey_acc", ".2f"),
    ("multi-key acc", "multikey_acc", ".2f"), ("KL prose", "prose_kl", ".4f"), ("KL code", "code_kl", ".4f"),
    ("ppl prose", "prose_ppl", ".2f"), ("ppl code", "code_ppl", ".2f"), ("greedy agreement", "agreement", ".2f"),
    ("KV MiB", "kv_bytes", ""), ("peak RSS delta MiB", "peak_rss_mb", ".0f"),
    ("decode ms/token", "decode_s_per_token", ""),
)


def summary_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The summary rows as one markdown table (what the docs embed; `tests/unit/kv/test_docs_kv.py` checks the
    docs against this function applied to the committed results file).

    >>> print(summary_markdown([{"method": "dense", "budget": None, "length": 8, "bytes_fraction": 1.0,
    ...                          "kv_bytes": 2 * 2**20, "decode_s_per_token": 0.0125}]).splitlines()[2])
    | dense | - | 8 | 1.000 | n/a | n/a | n/a | n/a | n/a | n/a | n/a | 2.00 | n/a | 12.5 |
    """
    head = "| " + " | ".join(h for h, _, _ in TABLE_COLUMNS) + " |"
    rule = "|" + "|".join("---" if f in ("method",) else "---:" for _, f, _ in TABLE_COLUMNS) + "|"
    lines = [head, rule]
    for r in rows:
        cells = []
        for _, f, spec in TABLE_COLUMNS:
            v = r.get(f)
            if f == "method":
                name = str(v)
                cells.append(name + (f" (mean of {r['n_seeds']} seeds)" if r.get("n_seeds", 1) > 1 else ""))
            elif f == "budget":
                cells.append("-" if v is None else format(v, "g"))
            elif f == "kv_bytes":
                cells.append(_fmt(None if v is None else v / _MB, ".2f"))
            elif f == "decode_s_per_token":
                cells.append(_fmt(None if v is None else v * 1000, ".1f"))
            else:
                cells.append(_fmt(v, spec))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def passkey_by_length_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Dense passkey accuracy per prompt length as a markdown table (the docs' "where dense works" table).

    >>> print(passkey_by_length_markdown([{"method": "dense", "length": 512, "passkey_acc": 0.8,
    ...                                    "n_passkey_acc": 5}]))
    | tokens | dense passkey accuracy | prompts |
    |---:|---:|---:|
    | 512 | 0.80 | 5 |
    """
    lines = ["| tokens | dense passkey accuracy | prompts |", "|---:|---:|---:|"]
    for r in rows:
        if r["method"] == "dense" and r.get("passkey_acc") is not None:
            lines.append(f"| {r['length']} | {r['passkey_acc']:.2f} | {r['n_passkey_acc']} |")
    return "\n".join(lines)


def load_summary(directory: str | Path) -> dict[str, Any]:
    """``summary.json`` of a results directory (settings + rows)."""
    p = Path(directory) / "summary.json"
    if not p.is_file():
        raise InputError(f"no KV evaluation summary at {p}")
    return json.loads(p.read_text(encoding="utf-8"))


def threads_note() -> dict[str, Any]:
    """The CPU threading the timings were taken with."""
    return {"torch_threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS")}
