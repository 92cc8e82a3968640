"""Per-head ablation: what switching one kv head between the full cache and sinks + window does, measured end to end.

The calibration ranks heads by a *local* score (`sinkscope.kv.mass`: how much one layer's attention output changes
when the head streams). This module measures what the score stands for. Starting from a **base policy** (the
calibrated one at its budget, or all-full = dense), it toggles one kv head at a time (a full head streams, a
streaming head keeps every token) and runs the policy's exact dense per-head-masked forward
(`sinkscope.kv.attention.policy_masked`) on DEV probes (`sinkscope.kv.suite.build_suite(..., split="dev")`: DEV
prose and code, seeds below the EVAL ones -- never the evaluation data):

* retrieval probes (pass key, multi-key): the log-probability of the answer's tokens after the question, teacher
  forced (nats, summed over the answer's tokens), and whether every answer token is the argmax (the greedy answer);
* streams (prose, code): mean next-token KL(dense || policy) in nats/token over the last ``kl_tokens`` positions.

Per head, the **value of keeping it full** at the base policy: ``gain_logp`` = answer log-probability with the head
full minus with it streaming (mean over the retrieval probes), ``gain_kl`` = KL with it streaming minus with it full
(mean over the streams); whichever of the two states the base policy has, the other is the toggled run.

Cost: one forward per (head, probe). Layers before the toggled one compute exactly what the base run computed, so
their outputs are recorded once per probe and replayed (`_Replay`): a head in layer ``l`` costs the layers
``l..L-1`` only (about half a forward on average); tested equal to a plain forward.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sinkscope.errors import InputError
from sinkscope.io import append_jsonl, ensure_output_dir, read_jsonl, write_csv_atomic, write_json_atomic
from sinkscope.kv.attention import policy_masked
from sinkscope.kv.policy import KVPolicy
from sinkscope.kv.suite import RETRIEVAL_TASKS, STREAM_TASKS, Item, SuiteSpec, build_suite
from sinkscope.models.adapters import get_adapter
from sinkscope.progress import ProgressCallback

ROWS_FILE = "ablation_rows.jsonl"
SUMMARY_FILE = "ablation.json"
HEADS_CSV = "ablation_heads.csv"
#: the ranking criteria an ablation gives (`AblationResult.scores`)
GAINS = ("gain_logp", "gain_kl")


@dataclass(frozen=True)
class AblationOptions:
    """Which DEV probes to run. Validated at construction (one-line errors).

    Attributes:
        length: tokens per probe (the policy's target length).
        depths: needle depths of the retrieval probes.
        tasks: probe kinds, from ``passkey``, ``multikey``, ``prose``, ``code``.
        kl_tokens: scored tail of each stream (positions whose KL is averaged).
    """

    length: int = 1024
    depths: tuple[float, ...] = (0.25, 0.75)
    tasks: tuple[str, ...] = ("passkey", "multikey", "prose", "code")
    kl_tokens: int = 256

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in (*RETRIEVAL_TASKS, *STREAM_TASKS)]
        if bad or not self.tasks:
            raise InputError(f"ablation tasks must be among passkey, multikey, prose, code; got {list(self.tasks)}",
                             param="tasks")
        if not 1 <= self.kl_tokens < self.length // 2:
            raise InputError(f"kl_tokens must be in 1..{self.length // 2 - 1}, got {self.kl_tokens}",
                             param="kl_tokens")
        SuiteSpec(lengths=(self.length,), depths=self.depths, tasks=self.tasks, score_tokens=self.kl_tokens)


def dev_probes(tokenizer: Any, options: AblationOptions, *, prose: str | None = None,
               code: str | None = None) -> list[Item]:
    """The DEV probe items (`build_suite` with ``split="dev"``: calibration prose and code, DEV seeds)."""
    spec = SuiteSpec(lengths=(options.length,), depths=options.depths, tasks=options.tasks, n_streams=1, n_agree=0,
                     score_tokens=options.kl_tokens)
    return build_suite(tokenizer, spec, prose=prose, code=code, split="dev").items


def toggled(policy: KVPolicy, layer: int, head: int) -> KVPolicy:
    """``policy`` with kv head ``(layer, head)`` switched between full and streaming."""
    heads = [set(h) for h in policy.full_heads]
    heads[layer] ^= {head}
    return policy.with_fields(full_heads=tuple(tuple(sorted(h)) for h in heads), kind="ablation")


def all_full(policy: KVPolicy) -> KVPolicy:
    """Every kv head keeps the full cache (the dense model, as a policy)."""
    return policy.with_fields(full_heads=tuple(tuple(range(policy.n_kv_heads)) for _ in range(policy.n_layers)),
                              kind="dense")


class _Replay:
    """Records every decoder layer's output in one forward, then replays layers ``< start`` from the record."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = get_adapter(model).layer_modules
        self.outputs: list[Any] = []

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        self.outputs = [None] * len(self.layers)

        def hook(i: int):
            def f(_m: nn.Module, _a: Any, out: Any) -> None:
                self.outputs[i] = out
            return f

        handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(self.layers)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def replaying(self, start: int) -> Iterator[None]:
        """Layers ``0..start-1`` return their recorded output without computing."""
        patched = []
        for i in range(start):
            out = self.outputs[i]
            self.layers[i].forward = (lambda *_a, _out=out, **_k: _out)  # type: ignore[method-assign]
            patched.append(self.layers[i])
        try:
            yield
        finally:
            for layer in patched:
                del layer.forward  # back to the class's forward


class _Probe:
    """One probe's scoring: the ids to feed, the positions to keep, and how to score their log-probabilities."""

    def __init__(self, item: Item, tokenizer: Any, device: torch.device) -> None:
        self.item = item
        if item.task in RETRIEVAL_TASKS:
            self.answer = list(tokenizer(" " + str(item.answer), add_special_tokens=False)["input_ids"])
            ids = list(item.ids) + self.answer[:-1]
            self.keep = len(self.answer)
        else:
            self.answer = []
            ids = list(item.ids)
            self.keep = item.length - item.context_len
        self.ids = torch.tensor([ids], device=device)

    def logprobs(self, model: nn.Module) -> Tensor:
        out = model(input_ids=self.ids, use_cache=False, logits_to_keep=self.keep)
        return torch.log_softmax(out.logits[0, -self.keep:].float(), dim=-1)

    def score(self, lp: Tensor, dense: Tensor) -> dict[str, Any]:
        if self.answer:
            target = torch.tensor(self.answer, device=lp.device)
            return {"answer_logp": float(lp.gather(1, target[:, None]).sum()),
                    "answer_match": bool((lp.argmax(-1) == target).all())}
        return {"kl": float((dense.exp() * (dense - lp)).sum(-1).mean())}


@dataclass
class AblationResult:
    """Per probe the base policy's scores and, per kv head, the toggled run's.

    Attributes:
        base: the policy the heads were toggled from.
        rows: one per (probe, run): ``{"probe", "task", "layer", "head", "state", ...scores}``; ``layer = head =
            -1`` for the base run and ``-2`` for the dense run; ``state`` = the toggled head's state in the run.
        options: the probes.
        seconds: wall time of the runs made by this call (a resumed run adds its own).
    """

    base: KVPolicy
    rows: list[dict[str, Any]]
    options: AblationOptions
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    def gains(self) -> np.ndarray:
        """(L, Hkv, 2): per kv head ``gain_logp`` and ``gain_kl`` (module docstring); NaN where not measured."""
        L, H = self.base.n_layers, self.base.n_kv_heads
        base = {r["probe"]: r for r in self.rows if r["layer"] == -1}
        sums = np.zeros((L, H, 2))
        counts = np.zeros((L, H, 2))
        for r in self.rows:
            if r["layer"] < 0 or r["probe"] not in base:
                continue
            b = base[r["probe"]]
            sign = 1.0 if r["state"] == "full" else -1.0  # toggled run full: gain = toggled - base
            if "answer_logp" in r:
                sums[r["layer"], r["head"], 0] += sign * (r["answer_logp"] - b["answer_logp"])
                counts[r["layer"], r["head"], 0] += 1
            if "kl" in r:
                sums[r["layer"], r["head"], 1] += sign * (b["kl"] - r["kl"])
                counts[r["layer"], r["head"], 1] += 1
        with np.errstate(invalid="ignore"):
            return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)

    def head_table(self) -> list[dict[str, Any]]:
        """One row per kv head: its state in the base policy, the gains, its matches, and the calibration's scores
        and ranks (1 = first kept) by every stored column, next to its rank by each gain."""
        g = self.gains()
        L, H = g.shape[:2]
        scores = self.base.scores_array()
        full = self.base.full_matrix()
        ranks = {}
        for j, name in enumerate(GAINS):
            ranks[name] = _ranks(np.nan_to_num(g[..., j], nan=-np.inf))
        from sinkscope.kv.policy import SCORE_COLUMNS

        if scores is not None:
            for j, name in enumerate(SCORE_COLUMNS[:scores.shape[-1]]):
                ranks[name] = _ranks(scores[..., j])
        matches: dict[tuple[int, int], list[int]] = {}
        for r in self.rows:
            if r["layer"] >= 0 and "answer_match" in r:
                m = matches.setdefault((r["layer"], r["head"]), [0, 0])
                m[0] += int(r["answer_match"])
                m[1] += 1
        out = []
        for layer in range(L):
            for head in range(H):
                row: dict[str, Any] = {"layer": layer, "head": head,
                                       "base_state": "full" if full[layer, head] else "streaming",
                                       "gain_logp": _num(g[layer, head, 0]), "gain_kl": _num(g[layer, head, 1])}
                m = matches.get((layer, head))
                row["toggled_answer_matches"] = None if m is None else m[0]
                if scores is not None:
                    for j, name in enumerate(SCORE_COLUMNS[:scores.shape[-1]]):
                        row[name] = float(scores[layer, head, j])
                for name, rk in ranks.items():
                    row[f"rank_{name}"] = int(rk[layer, head])
                out.append(row)
        return out

    def base_scores(self) -> dict[str, Any]:
        """The base policy's and the dense model's scores on the probes (answer log-prob, matches, KL)."""
        out: dict[str, Any] = {}
        for label, layer in (("dense", -2), ("base", -1)):
            rs = [r for r in self.rows if r["layer"] == layer]
            ret = [r for r in rs if "answer_logp" in r]
            st = [r for r in rs if "kl" in r]
            out[label] = {"answer_logp": _mean([r["answer_logp"] for r in ret]),
                          "answer_matches": sum(int(r["answer_match"]) for r in ret), "retrieval_probes": len(ret),
                          "kl": _mean([r["kl"] for r in st]), "streams": len(st)}
        return out

    def comparison(self, top: int | None = None) -> dict[str, Any]:
        """How the calibration's ranking agrees with the measured gains: Spearman correlation of every stored
        score column with each gain, and the ``top`` heads by each gain (default: the policy's full-head count)
        with their calibration rank (how many of them the policy keeps)."""
        from sinkscope.kv.policy import SCORE_COLUMNS

        if top is None:
            top = self.base.n_full if 0 < self.base.n_full < self.base.n_heads_total else 10
        g = self.gains()
        scores = self.base.scores_array()
        criterion = self.base.info.get("criterion_column", "drop_error")
        out: dict[str, Any] = {"criterion": criterion, "top": top, "spearman": {}, "top_heads": {}}
        table = {(r["layer"], r["head"]): r for r in self.head_table()}
        for j, gname in enumerate(GAINS):
            gv = g[..., j].ravel()
            ok = ~np.isnan(gv)
            if scores is not None:
                out["spearman"][gname] = {name: _spearman(scores[..., k].ravel()[ok], gv[ok])
                                          for k, name in enumerate(SCORE_COLUMNS[:scores.shape[-1]])}
            order = np.argsort(-np.nan_to_num(gv, nan=-np.inf), kind="stable")[:top]
            heads = []
            for flat in order:
                layer, head = divmod(int(flat), self.base.n_kv_heads)
                row = table[(layer, head)]
                heads.append({"layer": layer, "head": head, gname: row[gname], "base_state": row["base_state"],
                              f"rank_{criterion}": row.get(f"rank_{criterion}")})
            out["top_heads"][gname] = heads
            out["top_heads_kept"] = out.get("top_heads_kept", {})
            out["top_heads_kept"][gname] = sum(h["base_state"] == "full" for h in heads)
        return out

    def ranked_policy(self, gain: str = "gain_logp", budget: float | None = None, window: int | None = None
                      ) -> KVPolicy:
        """A policy whose full heads are the ``budget``'s worth with the largest measured ``gain`` (default the
        base policy's budget and window); ties and unmeasured heads fall back to the calibration's score. Its
        ``head_scores`` gain a column ``"ablation"`` (`sinkscope.kv.policy.SCORE_COLUMNS`) holding that order, so
        it re-cuts at other budgets (`sinkscope.kv.evaluate.policy_at_budget`) by the same order."""
        from sinkscope.kv.policy import SCORE_COLUMNS

        if gain not in GAINS:
            raise InputError(f"gain must be one of {', '.join(GAINS)}, got {gain!r}", param="gain")
        scores = self.base.scores_array()
        if scores is None:
            raise InputError("the base policy has no head scores (calibrate it first)", param="policy")
        g = self.gains()[..., GAINS.index(gain)]
        fallback = scores[..., SCORE_COLUMNS.index(self.base.info.get("criterion_column", "drop_error"))]
        # the gain orders the heads; the calibration's score (scaled into (0, 1e-6)) only breaks ties / fills NaN
        fb = (fallback - fallback.min()) / max(float(np.ptp(fallback)), 1e-30) * 1e-6
        order_score = np.where(np.isnan(g), np.nanmin(g) - 1.0, g) + fb
        base_cols = scores[..., :SCORE_COLUMNS.index("ablation")]
        full_scores = np.concatenate([base_cols, order_score[..., None]], axis=-1)
        b = self.base.budget if budget is None else budget
        w = self.base.window if window is None else window
        return KVPolicy.from_scores(full_scores, b, self.base.n_sink, w, self.base.target_length,
                                    model=self.base.model, criterion="ablation", kind="calibrated",
                                    calibration_sha256=self.base.calibration_sha256,
                                    info={"criterion": f"per-head ablation on DEV probes ({gain}) at the base "
                                                       "policy", "ablation_gain": gain,
                                          "ablation_base": {"n_full": self.base.n_full, "window": self.base.window,
                                                            "budget": self.base.budget}})

    def save(self, directory: str | Path) -> Path:
        """``ablation.json`` (options, base policy, base/dense scores, the comparison with the ranking, timing) and
        ``ablation_heads.csv`` (`head_table`); the rows stay in ``ablation_rows.jsonl`` (written as measured)."""
        d = ensure_output_dir(directory)
        write_csv_atomic(d / HEADS_CSV, self.head_table())
        write_json_atomic(d / SUMMARY_FILE, {
            "options": asdict(self.options), "base_policy": self.base.to_json(), "probes": self.base_scores(),
            "comparison": self.comparison(), "heads": self.head_table(), "seconds": self.seconds, "info": self.info})
        return d


def load_ablation(directory: str | Path) -> dict[str, Any]:
    """``DIR/ablation.json`` as written by `AblationResult.save`."""
    import json

    path = Path(directory) / SUMMARY_FILE
    if not path.is_file():
        raise InputError(f"no ablation results at {directory} ({SUMMARY_FILE} not found)")
    return json.loads(path.read_text(encoding="utf-8"))


def heads_markdown(summary: dict[str, Any], gain: str = "gain_logp", top: int | None = None) -> str:
    """The ``top`` kv heads by measured ``gain`` (default: as many as the base policy keeps full) as a Markdown
    table: each head's base state, both gains, and its rank by the calibration's drop error and distant mass."""
    heads = [h for h in summary["heads"] if h.get(gain) is not None]
    heads.sort(key=lambda h: (-h[gain], h["layer"], h["head"]))
    n = top or summary["comparison"]["top"]
    lines = ["| kv head | in the policy | answer log-prob gain (nats) | stream KL gain (nats/token) | rank by drop "
             "error | rank by distant mass |", "|---|---|---:|---:|---:|---:|"]
    for h in heads[:n]:
        kl = "-" if h.get("gain_kl") is None else f"{h['gain_kl']:.4f}"
        lines.append(f"| L{h['layer']}.{h['head']} | {h['base_state']} | {h['gain_logp']:.3f} | {kl} | "
                     f"{h.get('rank_drop_error', '-')} | {h.get('rank_distant', '-')} |")
    return "\n".join(lines)


def _num(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def _mean(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def _ranks(v: np.ndarray) -> np.ndarray:
    """Rank 1 = largest; ties by position (as `KVPolicy.from_scores` orders)."""
    flat = v.ravel()
    idx = np.arange(flat.size)
    order = idx[np.lexsort((idx, -flat))]
    r = np.empty(flat.size, dtype=int)
    r[order] = np.arange(1, flat.size + 1)
    return r.reshape(v.shape)


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    if a.size < 3:
        return None
    ra = np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(float)
    rb = np.argsort(np.argsort(b, kind="stable"), kind="stable").astype(float)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _settings_key(base: KVPolicy, options: AblationOptions) -> str:
    from sinkscope.kv.evaluate import fingerprint

    # the probe set is not in the key: a probe's key (task, length, depth, seed) fixes its text, so a rerun with
    # fewer or more probes reuses the rows of the probes it shares
    return fingerprint({"full_heads": [list(h) for h in base.full_heads], "n_sink": base.n_sink,
                        "window": base.window, "length": options.length, "kl_tokens": options.kl_tokens,
                        "model": base.model.get("name")})


@torch.no_grad()
def ablate(model: nn.Module, tokenizer: Any, base: KVPolicy, options: AblationOptions | None = None, *,
           out: str | Path | None = None, heads: Sequence[tuple[int, int]] | None = None,
           probes: Sequence[Item] | None = None, replay: bool = True,
           progress: ProgressCallback | None = None) -> AblationResult:
    """Toggle each kv head of ``base`` (full <-> streaming) and score the DEV probes (module docstring).

    Args:
        model, tokenizer: the model the policy is for, and its tokenizer.
        base: the operating point (e.g. the calibrated policy); `all_full` for the stream-one-head-alone ablation.
        options: the probes (default `AblationOptions()` at ``base.target_length``).
        out: a directory: rows are appended to ``ablation_rows.jsonl`` as measured, and a rerun skips those already
            there (same base policy and options), so a killed run resumes; the caller holds the directory's lock.
        heads: the (layer, kv head) pairs to toggle (default: all).
        probes: the probe items (default `dev_probes`; tests).
        replay: replay the unchanged layers before the toggled one (`_Replay`); False recomputes them (tests).
        progress: called with (runs done, total, what).
    """
    base.check_model(model)
    options = options or AblationOptions(length=base.target_length)
    from sinkscope.devices import model_device

    device = model_device(model)
    items = list(probes) if probes is not None else dev_probes(tokenizer, options)
    heads = list(heads) if heads is not None else [(l, h) for l in range(base.n_layers)
                                                   for h in range(base.n_kv_heads)]
    key = _settings_key(base, options)
    path = Path(out) / ROWS_FILE if out is not None else None
    if path is not None:
        ensure_output_dir(path.parent)
    probe_keys = {it.key for it in items}
    old = [r for r in read_jsonl(path) if r.get("settings") == key and r["probe"] in probe_keys] if path else []
    done = {(r["probe"], r["layer"], r["head"]): r for r in old}
    rows = list(done.values())
    total = len(items) * (len(heads) + 2)
    count = 0
    started = time.perf_counter()
    replayer = _Replay(model)
    dense_policy = all_full(base)

    def emit(row: dict[str, Any]) -> None:
        row["settings"] = key
        rows.append(row)
        if path is not None:
            append_jsonl(path, row)

    for item in items:
        probe = _Probe(item, tokenizer, device)
        todo = [(l, h) for l, h in heads if (item.key, l, h) not in done]
        need_base = todo or (item.key, -1, -1) not in done or (item.key, -2, -2) not in done
        if not need_base:
            count += len(heads) + 2
            continue
        with policy_masked(model, dense_policy):
            dense = probe.logprobs(model)
        if (item.key, -2, -2) not in done:
            emit({"probe": item.key, "task": item.task, "layer": -2, "head": -2, "state": "dense",
                  **probe.score(dense, dense)})
        count += 1
        with replayer.recording(), policy_masked(model, base):
            lp = probe.logprobs(model)
        if (item.key, -1, -1) not in done:
            emit({"probe": item.key, "task": item.task, "layer": -1, "head": -1, "state": "base",
                  **probe.score(lp, dense)})
        count += 1
        if progress is not None:
            progress(count, total, f"{item.key} base")
        for layer, head in heads:
            count += 1
            if (item.key, layer, head) in done:
                continue
            p = toggled(base, layer, head)
            state = "full" if head in p.full_heads[layer] else "streaming"
            ctx = replayer.replaying(layer) if replay else contextlib.nullcontext()
            with ctx, policy_masked(model, p):
                lp = probe.logprobs(model)
            emit({"probe": item.key, "task": item.task, "layer": layer, "head": head, "state": state,
                  **probe.score(lp, dense)})
            if progress is not None:
                progress(count, total, f"{item.key} L{layer}.{head}")
        replayer.outputs = []
    return AblationResult(base, rows, options, time.perf_counter() - started,
                          {"probes": [it.key for it in items], "replay": replay})
