"""Yona et al.'s repeated token as a sink, measured per run length N: does a copy of the run become a sink, and
does the last copy's hidden state converge to the one-token sequence's (their Theorem 4.1)?

For one prompt ``prefix + [x] * N`` (a form of `sinkscope.repetition.prompts`), one pass of the sink profiler
(`sinkscope.profile.profile_sinks`, linear memory) gives alpha for every key (Gu et al.; ``alpha[l, h, k]`` = mean
attention key ``k`` receives from the queries that see it), and forward hooks on the decoder layers keep only the
last position's hidden state. From those:

* ``share_by_copy[i]``: the share of all heads (layers x heads) with ``alpha > eps`` at copy ``i + 1`` (the
  project's ``Sink_k^eps`` at that key position). A copy near the end of the run is seen by few queries (copy
  ``i + 1`` by ``N - i``; the last one only by itself), so its alpha is mostly its own self-attention: only copies
  seen by at least ``min_queries`` queries count towards ``first_sink_copy``, the first copy whose share reaches
  ``share`` (None if none does).
* ``sink0``: ``Sink_0^eps``, token 0's share of heads, in the same prompt (how much sink the run leaves token 0).
* ``distance[l]``: ``||h_l(last copy) - h_l(x)|| / ||h_l(x)||``, ``cosine[l]`` and ``norm_ratio[l]`` (the two
  norms' ratio: where the one-token sequence carries a massive activation, the distance is ~1 until the last copy
  carries it too), where ``h_l(x)`` is the hidden state after decoder layer ``l`` of the one-token sequence (the
  ``bare`` form with one copy: whatever special tokens the tokenizer adds, then ``x``). Theorem 4.1 says the
  distance goes to 0 as N grows. (In the ``bare`` form without a BOS it is 0 at every N: every position sees only
  copies of one value.)

The defaults (``eps`` 0.3 as in Gu et al.; ``share`` 0.5; ``min_queries`` 8) were set before any run, not chosen
on any word list. `run_sink_runs` appends one line per (word, form, N) to ``cells.jsonl`` and resumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sinkscope.errors import InputError
from sinkscope.hooks import forward_hooks
from sinkscope.io import OutputLock, append_jsonl, check_resume_plan, read_jsonl, write_csv_atomic, write_json_atomic
from sinkscope.metrics.sink import DEFAULT_EPS, check_count, check_eps, is_sink
from sinkscope.models.adapters import ModelAdapter, get_adapter
from sinkscope.profile import profile_sinks
from sinkscope.progress import ProgressCallback
from sinkscope.repetition.prompts import build_prompt, check_form

CELLS_FILE = "cells.jsonl"
PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class SinkRunOptions:
    """How a run's copies are judged, checked once when built (before any model loads).

    Attributes:
        eps: a head sinks on a key when its alpha there exceeds eps, in (0, 1).
        share: a copy is a sink when the share of heads that sink on it reaches this, in (0, 1].
        min_queries: copies seen by fewer queries (the run's last ``min_queries - 1``) do not count towards
            ``first_sink_copy``, >= 1.
    """

    eps: float = DEFAULT_EPS
    share: float = 0.5
    min_queries: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", check_eps(self.eps))
        if not isinstance(self.share, (int, float)) or not 0 < self.share <= 1:
            raise InputError(f"--share must be in (0, 1], got {self.share!r}", param="share")
        check_count(self.min_queries, param="min_queries", minimum=1)


def first_sink_copy(share_by_copy: Sequence[float], share: float, min_queries: int) -> int | None:
    """The 1-based index of the first copy whose share of sinking heads reaches ``share``, among the copies seen by
    at least ``min_queries`` queries (copy ``i + 1`` of ``N`` is seen by ``N - i``); None if none.

    >>> first_sink_copy([0.1, 0.6, 0.2, 0.9], 0.5, 1)
    2
    >>> first_sink_copy([0.1, 0.2, 0.9, 0.9], 0.5, 3) is None
    True
    """
    n = len(share_by_copy)
    for i, s in enumerate(share_by_copy):
        if n - i >= min_queries and s >= share:
            return i + 1
    return None


def singleton_distance(h_last: Tensor, h_single: Tensor) -> tuple[list[float], list[float]]:
    """Per layer, ``||a - b|| / ||b||`` and ``cos(a, b)`` of ``h_last`` (L, D) against ``h_single`` (L, D)."""
    a, b = h_last.double(), h_single.double()
    rel = (a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-30)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return rel.tolist(), cos.tolist()


@torch.no_grad()
def last_hidden_states(model: nn.Module, ids: Sequence[int], *, eps: float = DEFAULT_EPS,
                       adapter: ModelAdapter | None = None) -> tuple[Tensor, np.ndarray]:
    """One profiler pass over ``ids``: ``(h, alpha)`` with ``h`` (L, D) the last position's hidden state after each
    decoder layer (fp32, on the CPU) and ``alpha`` (La, H, T) the profile's alpha."""
    a = adapter or get_adapter(model)
    got: dict[int, Tensor] = {}

    def keep(l: int, x: Tensor) -> None:
        got[l] = x[0, -1].detach().float().cpu()

    hooks: list[tuple[nn.Module, Any, bool]] = [(m, (lambda x, l=l: keep(l, x)), False)
                                                for l, m in enumerate(a.layer_modules)]
    with forward_hooks(hooks):
        prof = profile_sinks(model, [list(ids)], eps=eps, batch_size=1, adapter=a)
    return torch.stack([got[l] for l in range(a.n_layers)]), prof.alpha[0]


def measure_cell(model: nn.Module, tokenizer: Any, word: str, n: int, form: str, h_single: Tensor, *,
                 eps: float = DEFAULT_EPS, adapter: ModelAdapter | None = None) -> dict[str, Any]:
    """One (word, form, N) cell: ``share_by_copy`` (N,), ``sink0``, ``distance`` and ``cosine`` (L,) of the last
    copy against ``h_single`` (L, D) (see the module docstring), with the prompt's length and run start."""
    a = adapter or get_adapter(model)
    p = build_prompt(tokenizer, word, n, form, max_positions=a.max_positions)
    h, alpha = last_hidden_states(model, p.ids, eps=eps, adapter=a)
    copies = is_sink(alpha[:, :, p.run_start:], eps).mean(axis=(0, 1))  # (N,)
    rel, cos = singleton_distance(h, h_single)
    return {"word": p.word, "form": form, "n": n, "length": p.length, "run_start": p.run_start,
            "sink0": float(is_sink(alpha[:, :, 0], eps).mean()),
            "share_by_copy": [round(float(s), 6) for s in copies],
            "distance": [round(x, 6) for x in rel], "cosine": [round(x, 6) for x in cos],
            "norm_ratio": [round(float(x), 6) for x in (h.double().norm(dim=-1) /
                                                        h_single.double().norm(dim=-1).clamp_min(1e-30))]}


def singleton_state(model: nn.Module, tokenizer: Any, word: str, *, adapter: ModelAdapter | None = None) -> Tensor:
    """(L, D) hidden state of the one-token sequence ``(x)`` (the ``bare`` form with one copy) after each layer."""
    ids = build_prompt(tokenizer, word, 1, "bare").ids
    return last_hidden_states(model, ids, adapter=adapter)[0]


@dataclass
class SinkRunResult:
    """Every measured cell and its per-(form, N) summary under ``options``."""

    cells: list[dict[str, Any]]
    options: SinkRunOptions
    settings: dict[str, Any] = field(default_factory=dict)

    def cell_rows(self) -> list[dict[str, Any]]:
        """One row per cell: the scalars (first sink copy, largest share among counted copies, Sink_0, distance
        and cosine at the last layer and their minimum / maximum over layers)."""
        o = self.options
        rows = []
        for c in self.cells:
            s = c["share_by_copy"]
            counted = s[:max(len(s) - o.min_queries + 1, 0)]
            d, cos = np.asarray(c["distance"]), np.asarray(c["cosine"])
            rows.append({"word": c["word"], "form": c["form"], "n": c["n"],
                         "first_sink_copy": first_sink_copy(s, o.share, o.min_queries),
                         "max_share": max(counted) if counted else None,
                         "first_copy_share": s[0], "sink0": c["sink0"],
                         "distance_last_layer": float(d[-1]), "distance_min": float(d.min()),
                         "distance_max": float(d.max()), "cosine_last_layer": float(cos[-1]),
                         "cosine_min": float(cos.min())})
        return rows

    def summary(self) -> list[dict[str, Any]]:
        """Per (form, N): words, words with a sink copy, median first sink copy among them, mean largest share,
        mean Sink_0, and the per-layer means of the distance, cosine and norm ratio ``||h(last)|| / ||h((x))||``
        to the singleton."""
        rows = self.cell_rows()
        out = []
        for form in dict.fromkeys(c["form"] for c in self.cells):
            for n in sorted({c["n"] for c in self.cells if c["form"] == form}):
                cs = [c for c in self.cells if c["form"] == form and c["n"] == n]
                rs = [r for r in rows if r["form"] == form and r["n"] == n]
                firsts = [r["first_sink_copy"] for r in rs if r["first_sink_copy"] is not None]
                shares = [r["max_share"] for r in rs if r["max_share"] is not None]
                dist = np.mean([c["distance"] for c in cs], axis=0)
                cos = np.mean([c["cosine"] for c in cs], axis=0)
                norm = np.mean([c["norm_ratio"] for c in cs], axis=0)
                out.append({"form": form, "n": n, "words": len(cs), "words_with_sink_copy": len(firsts),
                            "median_first_sink_copy": float(np.median(firsts)) if firsts else None,
                            "mean_max_share": float(np.mean(shares)) if shares else None,
                            "mean_first_copy_share": float(np.mean([r["first_copy_share"] for r in rs])),
                            "mean_sink0": float(np.mean([c["sink0"] for c in cs])),
                            "distance_last_layer": float(dist[-1]), "distance_mean_over_layers": float(dist.mean()),
                            "cosine_last_layer": float(cos[-1]), "cosine_mean_over_layers": float(cos.mean()),
                            "distance_by_layer": [round(float(x), 6) for x in dist],
                            "cosine_by_layer": [round(float(x), 6) for x in cos],
                            "norm_ratio_by_layer": [round(float(x), 6) for x in norm]})
        return out

    def curve(self, form: str, n: int) -> np.ndarray:
        """(N,) share of sinking heads per copy, averaged over the words of (form, N)."""
        cs = [c["share_by_copy"] for c in self.cells if c["form"] == form and c["n"] == n]
        if not cs:
            raise InputError(f"no cells for form {form!r} at N = {n}")
        return np.mean(cs, axis=0)

    def curves(self) -> list[dict[str, Any]]:
        """Per form, at its longest N: one row per copy with the number of queries that see it and the mean share
        of sinking heads over the words."""
        rows = []
        for form in dict.fromkeys(c["form"] for c in self.cells):
            n = max(c["n"] for c in self.cells if c["form"] == form)
            rows += [{"form": form, "n": n, "copy": i + 1, "queries": n - i, "mean_share": round(float(s), 6)}
                     for i, s in enumerate(self.curve(form, n))]
        return rows

    def save(self, out_dir: str | Path) -> list[Path]:
        """``summary.json`` (options, settings, summary), ``summary.csv``, ``cells.csv`` (per-cell scalars) and
        ``curves.csv`` (per form, the mean share per copy at the longest N), atomically (``cells.jsonl`` and
        ``plan.json`` are written while the cells run)."""
        out = Path(out_dir)
        summ = self.summary()
        write_json_atomic(out / "summary.json", {"options": asdict(self.options), "settings": self.settings,
                                                 "summary": summ})
        write_csv_atomic(out / "summary.csv", [{k: v for k, v in r.items() if not isinstance(v, list)}
                                               for r in summ])
        write_csv_atomic(out / "cells.csv", self.cell_rows())
        write_csv_atomic(out / "curves.csv", self.curves())
        return [out / f for f in ("summary.json", "summary.csv", "cells.csv", "curves.csv")]


def _check_plan(out: Path, settings: dict[str, Any]) -> None:
    """Refuse (one line) a directory made under other settings; write ``plan.json`` if new (`io.check_resume_plan`)."""
    check_resume_plan(out, settings, kind="sink-run plan", made="cells measured", name=PLAN_FILE)


def run_sink_runs(model: nn.Module, tokenizer: Any, words: Sequence[str], forms: Sequence[str], ns: Sequence[int],
                  out_dir: str | Path | None = None, *, options: SinkRunOptions | None = None,
                  settings: dict[str, Any] | None = None, progress: ProgressCallback | None = None,
                  lock: bool = True) -> SinkRunResult:
    """Measure every (word, form, N) cell (`measure_cell`); with ``out_dir``, append each to ``cells.jsonl`` as it
    finishes and skip the cells already there (resume).

    Args:
        settings: what else identifies the measurements (model, dtype, ...), stored in ``plan.json`` with eps; a
            directory made under other settings is refused.
        progress: ``progress(done, total, "cells")`` after every cell.
        lock: hold an `OutputLock` on ``out_dir`` (False: the caller holds it).

    Raises:
        InputError: no words, forms or lengths; an unknown form; a word that is not one token; a prompt longer than
            the model's context; an ``out_dir`` of other settings.
    """
    o = options or SinkRunOptions()
    if not words or not forms or not ns:
        raise InputError("give at least one word, one prompt form and one run length")
    for f in forms:
        check_form(f)
    if min(ns) < 1:
        raise InputError(f"run lengths must be positive integers, got {min(ns)}", param="lengths")
    a = get_adapter(model)
    for w in words:  # every prompt checked before any measurement (one-token words, context length)
        for f in forms:
            build_prompt(tokenizer, w, max(ns), f, max_positions=a.max_positions)
    out = Path(out_dir) if out_dir is not None else None
    plan = {**(settings or {}), "eps": o.eps}
    guard = OutputLock(out) if out is not None and lock else None
    if guard is not None:
        guard.acquire()
    try:
        done: dict[tuple[str, str, int], dict[str, Any]] = {}
        if out is not None:
            _check_plan(out, plan)
            done = {(c["word"], c["form"], c["n"]): c for c in read_jsonl(out / CELLS_FILE)}
        todo = [(w, f, n) for w in words for f in forms for n in ns]
        total, count = len(todo), 0
        singles: dict[str, Tensor] = {}
        cells = []
        for w, f, n in todo:
            key = (w.strip(), f, n)
            if key not in done:
                if w not in singles:
                    singles[w] = singleton_state(model, tokenizer, w, adapter=a)
                cell = measure_cell(model, tokenizer, w, n, f, singles[w], eps=o.eps, adapter=a)
                if out is not None:
                    append_jsonl(out / CELLS_FILE, cell)
                done[key] = cell
            cells.append(done[key])
            count += 1
            if progress is not None:
                progress(count, total, "cells")
    finally:
        if guard is not None:
            guard.release()
    return SinkRunResult(cells, o, plan)
