"""Cluster attack (our construction after Yona et al. 2503.08908): non-repeating token sequences that trigger the
first-token circuit the way a run of one repeated token does.

1. Layer-0 single-token representations in closed form: a lone token attends only to itself, so layer 0's
   attention output is ``W_O W_V norm(E[token])`` (value heads repeated over their query groups).
2. Cosine k-means on them.
3. Search: sample short sequences from every cluster, score each cluster by how strongly the patch's components
   (sink neurons, or the first-token direction) fire at positions > 0 relative to their ordinary-text range,
   keep the best.
4. Verdict: instructed prompts whose answer is ``[attack sequence of N tokens] + [tail copies of the word]``,
   compared with ``N + tail`` plain copies and with N uniformly random tokens + the same tail; each answered by the
   unpatched model and, given a defence patch (e.g. the shipped default, de-duplication), under it. Rates carry
   their Wilson 95% interval (`sinkscope.metrics.rates`).

Every sequence is drawn from a generator seeded by (seed, N, kind, word) alone, and answers are appended to
``cells.jsonl`` as each batch ends, so an interrupted run resumes with the same prompts.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sinkscope.capture import forward_hooks
from sinkscope.devices import model_device
from sinkscope.errors import InputError
from sinkscope.inputs import pad_batch
from sinkscope.interventions.patch import SinkPatch, apply_patch
from sinkscope.io import OutputLock, append_jsonl, check_resume_plan, read_jsonl, write_csv_atomic, write_json_atomic
from sinkscope.metrics.rates import wilson_interval
from sinkscope.models.adapters import get_adapter, pad_token_id
from sinkscope.models.generate import greedy_continue
from sinkscope.progress import ProgressCallback
from sinkscope.repetition.grid import patch_fingerprint
from sinkscope.repetition.judge import judge_answer
from sinkscope.repetition.prompts import build_prompt

#: clusters with fewer tokens than this are not scored (too few to sample varied sequences from)
MIN_CLUSTER = 8


@dataclass(frozen=True)
class ClusterAttackOptions:
    """Settings of `cluster_attack`, checked on construction (before any model loads).

    Attributes:
        k: clusters of the layer-0 single-token representations; probe_clusters: the largest ones scored.
        probe_length: tokens of the sequence sampled to score a cluster; tail: copies of the word after the attack
            sequence; max_new_tokens / batch_size: the greedy answers; seed: k-means and sampling;
        vocab_limit: only the first ids of the vocabulary (None: all).
    """

    k: int = 64
    probe_clusters: int = 64
    probe_length: int = 64
    tail: int = 16
    max_new_tokens: int = 24
    batch_size: int = 8
    seed: int = 0
    vocab_limit: int | None = None

    def __post_init__(self) -> None:
        for name in ("k", "probe_clusters", "probe_length", "tail", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}",
                                 param=name)


def check_scorable(patch: SinkPatch) -> None:
    """InputError unless the patch has components with an ordinary range to score clusters against."""
    if not patch.rules and not patch.directions:
        raise InputError("the patch has no neurons or directions to score clusters with")
    if any(t <= 0 for r in patch.rules for t in r.threshold):
        raise InputError("the patch's neuron rules have threshold 0 (the paper's patch clamps at every position), "
                         "so its neurons have no ordinary range to score clusters against: use a patch made by "
                         "--method neurons or direction")


def _layer0_norm(model: nn.Module) -> nn.Module:
    norm = get_adapter(model).attention_norm(0)
    if norm is None:
        raise InputError("this architecture has no pre-attention norm in the adapter table")
    return norm


@torch.no_grad()
def layer0_representations(model: nn.Module, token_ids: Tensor | None = None) -> Tensor:
    """(V', d_model) layer-0 attention output of each token alone (closed form ``W_O W_V norm(E)``)."""
    a = get_adapter(model)
    emb = model.get_input_embeddings().weight.detach().float()
    if token_ids is not None:
        emb = emb[token_ids]
    x = _layer0_norm(model).float()(emb)
    v = a.projection_modules(0)["v"].float()(x)  # (V, Hkv*D)
    v = v.view(len(x), a.n_kv_heads, a.d_head).repeat_interleave(a.kv_groups, dim=1).reshape(len(x), -1)
    return a.output_projection(0).float()(v)  # (V, d_model)


def cosine_kmeans(x: Tensor, k: int, *, iters: int = 15, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Spherical k-means: returns (labels (N,), centroids (k, D))."""
    if k < 1 or k > len(x):
        raise InputError(f"k must be in 1..{len(x)}, got {k}")
    g = torch.Generator().manual_seed(seed)
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    cent = xn[torch.randperm(len(xn), generator=g)[:k]].clone()
    labels = torch.zeros(len(xn), dtype=torch.long)
    for _ in range(iters):
        labels = (xn @ cent.T).argmax(-1)
        for j in range(k):
            members = xn[labels == j]
            if len(members):
                cent[j] = torch.nn.functional.normalize(members.mean(0), dim=-1)
    return labels, cent


@dataclass
class ClusterAttackResult:
    """Cluster scores and the divergence rates of attack, repetition and random sequences, per variant (``none``:
    the unpatched model; otherwise the name of the defence patch the answers were generated under)."""

    clusters: list[dict[str, Any]]  # per scored cluster: id, size, score, example tokens
    best_cluster: int
    rates: list[dict[str, Any]]  # per (n, kind, variant): words, diverged, stopped, repeats, rate, 95% interval
    rows: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"best_cluster": self.best_cluster, "rates": self.rates, "clusters": self.clusters,
                "settings": self.settings, "rows": self.rows}

    def save(self, out_dir: str | Path) -> list[Path]:
        """``cluster.json`` (everything), ``cluster.csv`` (one row per word, length, kind and variant) and
        ``rates.csv`` (one row per length, kind and variant), atomically."""
        out = Path(out_dir)
        write_json_atomic(out / "cluster.json", self.to_json())
        write_csv_atomic(out / "cluster.csv", self.rows)
        write_csv_atomic(out / "rates.csv", self.rates)
        return [out / "cluster.json", out / "cluster.csv", out / "rates.csv"]


KINDS = ("cluster", "repeat", "random")
NO_DEFENCE = "none"
CELLS_FILE = "cells.jsonl"
PLAN_FILE = "plan.json"


def summarise_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (n, kind, variant), in the order first seen: words, verdict counts, the divergence rate with its Wilson
    95% interval, and the mean firing of the scoring patch's components."""
    groups: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["n"], r["kind"], r["variant"]), []).append(r)
    out = []
    for (n, kind, variant), rs in groups.items():
        d = sum(bool(r["diverged"]) for r in rs)
        lo, hi = wilson_interval(d, len(rs))
        out.append({"n": n, "kind": kind, "variant": variant, "words": len(rs), "diverged": d,
                    "stopped": sum(r["verdict"] == "stopped" for r in rs),
                    "repeats": sum(r["verdict"] == "repeats" for r in rs), "rate": d / len(rs),
                    "ci_low": lo, "ci_high": hi, "sink_fire": sum(r["sink_fire"] for r in rs) / len(rs)})
    return out


def _body(kind: str, n: int, word: str, token_id: int, members: Tensor, allowed: Tensor, seed: int) -> list[int]:
    """The ``n`` tokens before the tail: ``n`` copies of the word's token, or draws (with replacement) from the
    best cluster or the whole vocabulary, from a generator seeded by (seed, n, kind, word) alone, so a cell's
    sequence does not depend on which other cells run (resuming gives the same prompts)."""
    if kind == "repeat":
        return [token_id] * n
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}|{n}|{kind}|{word}".encode()))
    pool = members if kind == "cluster" else allowed
    return pool[torch.randint(len(pool), (n,), generator=g)].tolist()


def _check_plan(out: Path, settings: dict[str, Any]) -> None:
    """Refuse (one line) a directory made under other settings; write ``plan.json`` if new (`io.check_resume_plan`)."""
    check_resume_plan(out, settings, kind="cluster-attack plan", made="answers made", name=PLAN_FILE)


@torch.no_grad()
def _fire_score(model: nn.Module, prompts: Sequence[Sequence[int]], starts: Sequence[int], patch: SinkPatch) -> Tensor:
    """Per prompt: how strongly the patch's components fire from position ``start`` on, in units of their
    ordinary-text range, capped at 10 and averaged over components and positions.

    Neuron rules: ``|a| / threshold``. Direction rules: ``(x . u - value) / (threshold - value)`` (0 at the
    ordinary median, 1 at the top of the ordinary range)."""
    a = get_adapter(model)
    ids, mask = pad_batch(prompts, pad_token_id(model), side="left", device=model_device(model))
    got: dict[str, Tensor] = {}
    hooks = [(a.mlp_down_module(r.layer), (lambda x, r=r: got.__setitem__(f"n{r.layer}", (
              x.detach().float()[..., r.index].abs() / torch.tensor(r.threshold).clamp_min(1e-6)))), True)
             for r in patch.rules]
    hooks += [(a.layer_modules[r.layer], (lambda x, r=r: got.__setitem__(f"d{r.layer}", (
               (x.detach().float() @ torch.tensor(r.direction) - r.value) / max(r.threshold - r.value, 1e-6)
               )[..., None])), False) for r in patch.directions]
    with forward_hooks(hooks):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    T = ids.shape[1]
    scores = []
    for b, (p, s) in enumerate(zip(prompts, starts)):
        lo = T - len(p) + s
        scores.append(torch.cat([v[b, lo:] for v in got.values()], dim=-1).clamp(-10, 10).mean())
    return torch.stack(scores)


def cluster_attack(model: nn.Module, tokenizer: Any, patch: SinkPatch, words: Sequence[str], ns: Sequence[int],
                   options: ClusterAttackOptions | None = None, *, defence: tuple[str, SinkPatch] | None = None,
                   out_dir: str | Path | None = None, settings: dict[str, Any] | None = None,
                   progress: ProgressCallback | None = None, lock: bool = True) -> ClusterAttackResult:
    """Score token clusters by sink-neuron firing, then compare divergence of the best cluster's sequences with
    plain repetition and random sequences (see the module docstring), unpatched and under a defence patch.

    Args:
        patch: its rules name the components (sink neurons or first-token directions) and their ordinary ranges
            (`build_patch` / `build_direction_patch`): what the search tries to excite.
        words: words whose instruction and tail frame the sequences.
        ns: attack sequence lengths.
        options: `ClusterAttackOptions` (default: its defaults).
        defence: ``(name, patch)``: every prompt is also answered with this patch applied (e.g. the shipped default,
            de-duplication), as variant ``name``.
        out_dir: append each answer to ``cells.jsonl`` there as its batch ends and skip the answers already there
            (resume); ``plan.json`` holds the settings, and a directory made under others is refused.
        settings: what else identifies the answers (model, dtype, ...), stored in ``plan.json``.
        progress: ``progress(done, total, "answers")`` after every batch.
        lock: hold an `OutputLock` on ``out_dir`` (False: the caller holds it).
    """
    o = options or ClusterAttackOptions()
    k, probe_length, probe_clusters, tail, seed = o.k, o.probe_length, o.probe_clusters, o.tail, o.seed
    check_scorable(patch)
    if not words or not ns or min(ns) < 1:
        raise InputError("give at least one word and positive attack lengths")
    if defence is not None and defence[0] == NO_DEFENCE:
        raise InputError(f"the defence patch cannot be named {NO_DEFENCE!r}")
    g = torch.Generator().manual_seed(seed)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    V = o.vocab_limit or model.get_input_embeddings().weight.shape[0]
    allowed = torch.tensor([i for i in range(min(V, len(tokenizer))) if i not in special])
    reps = layer0_representations(model, allowed)
    if k > len(allowed):
        raise InputError(f"--k {k} is more clusters than the vocabulary's {len(allowed)} ordinary tokens", param="k")
    labels, _ = cosine_kmeans(reps, k, seed=seed)
    sizes = torch.bincount(labels, minlength=k)
    cand = [int(c) for c in torch.argsort(-sizes)[:probe_clusters] if sizes[c] >= MIN_CLUSTER]
    if not cand:
        raise InputError(f"no cluster has {MIN_CLUSTER} or more tokens (k={k} for {len(allowed)} tokens): use a "
                         "smaller --k", param="k")
    w0 = words[0]
    frame = build_prompt(tokenizer, w0, 1, "instruct")
    prefix = frame.ids[:frame.run_start]
    clusters = []
    for c in cand:
        members = allowed[labels == c]
        seq = members[torch.randint(len(members), (probe_length,), generator=g)].tolist()
        score = float(_fire_score(model, [prefix + seq], [len(prefix) + 1], patch)[0])
        clusters.append({"cluster": c, "size": int(sizes[c]), "score": score,
                         "examples": tokenizer.convert_ids_to_tokens(members[:8].tolist())})
    clusters.sort(key=lambda d: -d["score"])
    best = clusters[0]["cluster"]
    members = allowed[labels == best]
    variants: dict[str, SinkPatch | None] = {NO_DEFENCE: None}
    if defence is not None:
        variants[defence[0]] = defence[1]
    plan = {**(settings or {}), "k": k, "probe_clusters": probe_clusters, "probe_length": probe_length, "tail": tail,
            "seed": seed, "max_new_tokens": o.max_new_tokens, "vocab_limit": o.vocab_limit,
            "scoring_patch": patch_fingerprint(patch),
            "variants": {name: patch_fingerprint(p) for name, p in variants.items()}}
    out = Path(out_dir) if out_dir is not None else None
    guard = OutputLock(out) if out is not None and lock else None
    if guard is not None:
        guard.acquire()
    try:
        done: dict[tuple[int, str, str, str], dict[str, Any]] = {}
        if out is not None:
            _check_plan(out, plan)
            done = {(r["n"], r["kind"], r["variant"], r["word"]): r for r in read_jsonl(out / CELLS_FILE)}
        todo = [(n, kind, v) for v in variants for n in ns for kind in KINDS]
        total = len(todo) * len(words)
        count = sum((n, kind, v, w) in done for n, kind, v in todo for w in words)
        for n, kind, variant in todo:
            missing = [w for w in words if (n, kind, variant, w) not in done]
            for i in range(0, len(missing), o.batch_size):
                ws = missing[i:i + o.batch_size]
                prompts, starts = [], []
                for w in ws:
                    p = build_prompt(tokenizer, w, tail, "instruct")
                    pre, run = p.ids[:p.run_start], p.ids[p.run_start:]
                    prompts.append(pre + _body(kind, n, w, p.token_id, members, allowed, seed) + run)
                    starts.append(len(pre) + 1)
                handle = apply_patch(model, variants[variant]) if variants[variant] is not None else None  # type: ignore[arg-type]
                try:
                    outs = greedy_continue(model, prompts, max_new_tokens=o.max_new_tokens, batch_size=o.batch_size)
                    fire = _fire_score(model, prompts, starts, patch)
                finally:
                    if handle is not None:
                        handle.remove()
                new = []
                for w, ans, f in zip(ws, outs, fire.tolist()):
                    v = judge_answer(tokenizer, w, ans)
                    new.append({"n": n, "kind": kind, "variant": variant, "word": w, "verdict": v.verdict,
                                "diverged": v.diverged, "emitted": v.emitted[:80], "sink_fire": round(f, 6),
                                "new_tokens": len(ans)})
                if out is not None:
                    append_jsonl(out / CELLS_FILE, *new)
                for r in new:
                    done[(n, kind, variant, r["word"])] = r
                count += len(ws)
                if progress is not None:
                    progress(count, total, "answers")
    finally:
        if guard is not None:
            guard.release()
    rows = [done[(n, kind, v, w)] for n, kind, v in todo for w in words]
    return ClusterAttackResult(clusters, best, summarise_rows(rows), rows,
                               {**plan, "words": list(words), "ns": list(ns)})
