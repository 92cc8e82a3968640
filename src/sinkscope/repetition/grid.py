"""The one divergence grid: words x prompt forms x repetition lengths x patch variants, greedy answers judged whole,
batched, resumable cell by cell. `repeat scan` and `repeat evaluate` both run it.

A grid's output directory holds:

* ``plan.json``: the settings that change an answer apart from the cell's own coordinates (`answer_settings`:
  the model, its revision and dtype, the answer length, each variant's patch manifest). A run on a directory
  whose ``plan.json`` names other settings is refused in one line, so old answers are never reused under new
  settings. Words, forms and lengths are cell coordinates: adding some to an existing directory extends it.
  The device and the batch size change an answer only at floating-point noise and are recorded per cell
  (``batch_rows``), not refused (the published grid was finished on a CPU from a GPU's directory).
* ``cells.jsonl``: one strict JSON line per finished cell, appended a batch at a time (`sinkscope.io.append_jsonl`);
  a line cut by an interruption is dropped on resume, so a cell is either complete or redone.

The run holds an `sinkscope.io.OutputLock` on the directory: a second job on the same directory is refused.

Each cell: ``variant, form, n, word, token_id, prompt_tokens, batch_rows`` and the judge's fields
(`sinkscope.repetition.judge.Verdict.to_json`); cells of the words in ``sinkness_words`` also get the run's
layer-by-layer sinkness (`sinkscope.repetition.sinkness`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from sinkscope.errors import InputError
from sinkscope.interventions.patch import SinkPatch, apply_patch
from sinkscope.io import OutputLock, append_jsonl, read_jsonl, write_csv_atomic, write_json_atomic
from sinkscope.models.adapters import get_adapter
from sinkscope.models.generate import greedy_continue
from sinkscope.progress import ProgressCallback
from sinkscope.repetition.judge import eos_token_ids, judge_answer
from sinkscope.repetition.prompts import build_prompt, check_form, equal_length_batches
from sinkscope.repetition.sinkness import run_sinkness
from sinkscope.repetition.words import run_token_id

CELLS_FILE = "cells.jsonl"
PLAN_FILE = "plan.json"
#: the protocol's prompt forms and lengths (issue 13)
PROTOCOL_FORMS: tuple[str, ...] = ("instruct", "garak1", "garak3", "garak40", "garak-word1", "bare", "repeat-colon")
PROTOCOL_LENGTHS: tuple[int, ...] = (256, 512, 1024, 2048)
MIN_NEW_TOKENS = 128
NO_PATCH = "none"
#: run-sinkness scalars averaged per (variant, form, n) in the summary
SINKNESS_COLUMNS = ("alpha_run_max", "norm_ratio_max", "cos_first_max", "neuron_ratio_max", "sink_share_max")


def check_grid_settings(forms: Sequence[str], lengths: Sequence[int], max_new_tokens: int, batch_size: int) -> None:
    """One-line InputErrors for the settings of a grid that need no tokenizer (called before a model loads)."""
    if not forms:
        raise InputError("give at least one prompt form", param="forms")
    for f in forms:
        check_form(f)
    if not lengths or min(lengths) < 1:
        raise InputError("repetition lengths must be positive integers", param="lengths")
    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be a positive integer, got {max_new_tokens}", param="max_new_tokens")
    if batch_size < 1:
        raise InputError(f"--batch-size must be a positive integer, got {batch_size}", param="batch_size")


@dataclass(frozen=True)
class GridPlan:
    """What to run: every (variant, form, n, word) cell. ``variants`` name entries of the patches mapping
    (`NO_PATCH` = the unpatched model); ``sinkness_words``: words whose cells also get the sinkness pass (one
    extra forward each; None = every word). Cheap checks happen on construction (before any model loads);
    `validate` checks what needs the tokenizer."""

    words: list[str]
    forms: list[str]
    lengths: list[int]
    variants: list[str] = field(default_factory=lambda: [NO_PATCH])
    max_new_tokens: int = MIN_NEW_TOKENS
    batch_size: int = 8
    sinkness_words: list[str] | None = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.words or any(not w or not w.strip() for w in self.words):
            raise InputError("give at least one non-empty word", param="words")
        if len(set(self.words)) != len(self.words):
            twice = sorted({w for w in self.words if self.words.count(w) > 1})
            raise InputError(f"a word is given twice: {', '.join(twice)}", param="words")
        check_grid_settings(self.forms, self.lengths, self.max_new_tokens, self.batch_size)
        if not self.variants or len(set(self.variants)) != len(self.variants):
            raise InputError("variants must be distinct and at least one")

    @property
    def n_cells(self) -> int:
        return len(self.words) * len(self.forms) * len(self.lengths) * len(self.variants)

    def cells(self) -> Iterator[tuple[str, str, int, str]]:
        """(variant, form, n, word) of every cell, in plan order."""
        for v in self.variants:
            for f in self.forms:
                for n in self.lengths:
                    for w in self.words:
                        yield v, f, n, w

    def validate(self, tokenizer: Any, max_positions: int | None) -> None:
        """One-line InputErrors for a word that is not one token and a prompt that does not fit the model's context
        with the answer."""
        for w in self.words:
            run_token_id(tokenizer, w)
        for f in self.forms:
            for w in self.words:  # the longest prompt must fit (prefixes differ by word only slightly)
                build_prompt(tokenizer, w, max(self.lengths), f, max_positions=max_positions,
                             reserve=self.max_new_tokens)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def patch_fingerprint(patch: SinkPatch | None) -> str | None:
    """SHA-256 of a patch's manifest (None for the unpatched model): what identifies a variant's edit."""
    if patch is None:
        return None
    return hashlib.sha256(json.dumps(patch.to_json(), sort_keys=True).encode("utf-8")).hexdigest()


def answer_settings(*, model: str, dtype: str, revision: str | None, max_new_tokens: int,
                    patches: Mapping[str, SinkPatch | None]) -> dict[str, Any]:
    """The settings besides a cell's coordinates that change its answer (written to ``plan.json``)."""
    return {"model": model, "revision": revision, "dtype": dtype, "max_new_tokens": max_new_tokens,
            "variants": {name: patch_fingerprint(p) for name, p in patches.items()}}


def cell_key(variant: str, form: str, n: int, word: str) -> str:
    return f"{variant}\t{form}\t{n}\t{word}"


def read_cells(out_dir: str | Path) -> list[dict[str, Any]]:
    """The complete cells of a (possibly interrupted) grid: a last line cut by an interruption is dropped (and
    `sinkscope.io.append_jsonl` cuts it off the file before the next append)."""
    return read_jsonl(Path(out_dir) / CELLS_FILE)


def _check_settings(out: Path, settings: dict[str, Any], cells: Sequence[dict[str, Any]]) -> None:
    """Refuse (one line) a directory whose answers were made under other settings; adopt an older directory
    without ``plan.json`` only when its cells are judged whole and agree with the answer length."""
    plan_path = out / PLAN_FILE
    if plan_path.is_file():
        try:
            old = json.loads(plan_path.read_text(encoding="utf-8"))["settings"]
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{plan_path} is not a grid plan ({e}); use another --out") from None
        for k in ("model", "revision", "dtype", "max_new_tokens"):
            if old.get(k) != settings[k]:
                raise InputError(f"{out} holds answers made with {k}={old.get(k)!r}, this run asks {k}="
                                 f"{settings[k]!r}: use another --out (or the same settings to resume)")
        for name, fp in settings["variants"].items():
            if name in old.get("variants", {}) and old["variants"][name] != fp:
                raise InputError(f"{out} holds answers of a different patch named {name!r}: use another --out")
        return
    if not cells:
        return
    if any("verdict" not in c for c in cells):
        raise InputError(f"{out} holds cells from an older `repeat scan` (another judge) and no {PLAN_FILE}: "
                         "use another --out")
    n = settings["max_new_tokens"]
    if any(not c.get("eos") and c.get("new_tokens") != n for c in cells):
        raise InputError(f"{out} holds answers of another length than --max-new-tokens {n}: use another --out")


@dataclass
class GridResult:
    """Every cell of a plan, the plan and the settings it ran under."""

    plan: GridPlan
    cells: list[dict[str, Any]]
    settings: dict[str, Any]
    elapsed_s: float = 0.0

    def summary(self) -> list[dict[str, Any]]:
        return summarise_cells(self.cells)

    def save(self, out_dir: str | Path) -> None:
        """``cells.csv``, ``summary.csv`` and ``summary.json`` (settings, plan, summary, elapsed time), atomically
        (``cells.jsonl`` and ``plan.json`` are written while the grid runs)."""
        out = Path(out_dir)
        summary = self.summary()
        write_csv_atomic(out / "cells.csv", flat_rows(self.cells))
        write_csv_atomic(out / "summary.csv", flat_rows(summary))
        write_json_atomic(out / "summary.json", {"settings": self.settings, "plan": self.plan.to_json(),
                                                 "summary": summary, "elapsed_s": self.elapsed_s})


def flat_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """CSV rows: nested values dropped, every column in every row (rows may differ in their columns)."""
    flat = [{k: v for k, v in r.items() if not isinstance(v, (dict, list))} for r in rows]
    keys = list(dict.fromkeys(k for r in flat for k in r))
    return [{k: r.get(k, "") for k in keys} for r in flat]


def run_grid(model: nn.Module, tokenizer: Any, plan: GridPlan, patches: Mapping[str, SinkPatch | None],
             out_dir: str | Path, *, settings: dict[str, Any] | None = None, progress: ProgressCallback | None = None,
             lock: bool = True) -> GridResult:
    """Run every unfinished cell of ``plan`` (appending to ``out_dir/cells.jsonl``) and return all its cells.

    Prompts of one variant run ``plan.batch_size`` rows of equal length per ``generate`` call; the remainders of
    the length groups are pooled into padded batches (`equal_length_batches`).

    Args:
        patches: variant name -> patch (None: unpatched); every variant of the plan must be here.
        settings: `answer_settings` of this run (default: built from the model's spec and dtype as loaded).
        progress: ``progress(done, total, what)`` before each batch and at the end (cells found from an
            earlier run count as done).
        lock: hold an `OutputLock` on ``out_dir`` for the run (False: the caller holds it).
    """
    for v in plan.variants:
        if v not in patches:
            raise InputError(f"unknown variant {v!r}; known: {', '.join(patches)}")
    a = get_adapter(model)
    plan.validate(tokenizer, a.max_positions)
    if settings is None:
        src = getattr(model, "sinkscope_source", None)
        settings = answer_settings(model=str(getattr(src, "spec", "") or ""), dtype=str(model.dtype), revision=None,
                                   max_new_tokens=plan.max_new_tokens,
                                   patches={v: patches[v] for v in plan.variants})
    out = Path(out_dir)
    guard = OutputLock(out) if lock else None
    if guard is not None:
        guard.acquire()
    try:
        return _run(model, tokenizer, plan, patches, out, settings, progress, a.max_positions)
    finally:
        if guard is not None:
            guard.release()


def _run(model: nn.Module, tokenizer: Any, plan: GridPlan, patches: Mapping[str, SinkPatch | None], out: Path,
         settings: dict[str, Any], progress: ProgressCallback | None, max_positions: int | None) -> GridResult:
    t0 = time.perf_counter()
    old = read_cells(out)
    _check_settings(out, settings, old)
    merged = dict(settings)
    plan_path = out / PLAN_FILE
    if plan_path.is_file():  # keep the fingerprints of variants this run does not name
        prev = json.loads(plan_path.read_text(encoding="utf-8"))["settings"].get("variants", {})
        merged["variants"] = {**prev, **settings["variants"]}
    write_json_atomic(plan_path, {"settings": merged})
    done = {cell_key(c["variant"], c["form"], c["n"], c["word"]): c for c in old}
    keys = {cell_key(*c) for c in plan.cells()}
    total = plan.n_cells
    eos_ids = eos_token_ids(tokenizer)
    sink_words = set(plan.words if plan.sinkness_words is None else plan.sinkness_words)

    def report(what: str) -> None:
        if progress is not None:
            progress(sum(k in keys for k in done), total, what)

    for variant in plan.variants:
        todo = [build_prompt(tokenizer, w, n, f, max_positions=max_positions, reserve=plan.max_new_tokens)
                for v, f, n, w in plan.cells() if v == variant and cell_key(v, f, n, w) not in done]
        patch = patches[variant]
        for group in equal_length_batches(todo, plan.batch_size):
            lens = sorted({p.length for p in group})
            report(f"{variant}: {len(group)} rows of {lens[0]} tokens" if len(lens) == 1 else
                   f"{variant}: {len(group)} rows of {lens[0]}-{lens[-1]} tokens")
            handle = apply_patch(model, patch) if patch is not None else None
            try:
                outs = greedy_continue(model, [p.ids for p in group], max_new_tokens=plan.max_new_tokens,
                                       batch_size=len(group))
                rows = []
                for p, o in zip(group, outs):
                    row: dict[str, Any] = {"variant": variant, "form": p.form, "n": p.n, "word": p.word,
                                           "token_id": p.token_id, "prompt_tokens": p.length,
                                           "batch_rows": len(group)}
                    row.update(judge_answer(tokenizer, p.word, o, eos_ids).to_json())
                    if p.word in sink_words:
                        s = run_sinkness(model, p.ids, p.run_start)
                        row.update(s.summary())
                        row["sinkness"] = s.to_json()
                    rows.append(row)
            finally:
                if handle is not None:
                    handle.remove()
            append_jsonl(out / CELLS_FILE, *rows)
            for r in rows:
                done[cell_key(variant, r["form"], r["n"], r["word"])] = r
    report("done")
    cells = [done[cell_key(*c)] for c in plan.cells()]
    return GridResult(plan, cells, merged, time.perf_counter() - t0)


def summarise_cells(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (variant, form, n): words, diverged / stopped / repeats counts, the divergence rate, the loop
    rate, the mean run sinkness where measured, and (for patch variants) the relative reduction of divergence
    against `NO_PATCH` on the same words (NaN where nothing diverged unpatched)."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["variant"], c["form"], int(c["n"])), []).append(c)
    rows = []
    for (variant, form, n), cs in sorted(groups.items(), key=lambda kv: (kv[0][0] != NO_PATCH, kv[0])):
        k = len(cs)
        row: dict[str, Any] = {"variant": variant, "form": form, "n": n, "words": k,
                               "diverged": sum(c["verdict"] == "diverged" for c in cs),
                               "stopped": sum(c["verdict"] == "stopped" for c in cs),
                               "repeats": sum(c["verdict"] == "repeats" for c in cs),
                               "loops": sum(bool(c["loops"]) for c in cs)}
        row["rate"] = row["diverged"] / k
        row["loop_rate"] = row["loops"] / k
        base = groups.get((NO_PATCH, form, n))
        if variant != NO_PATCH and base:
            words = {c["word"] for c in cs}
            b = [c for c in base if c["word"] in words]
            rb = sum(c["verdict"] == "diverged" for c in b) / max(len(b), 1)
            row["rate_unpatched"] = rb
            row["relative_reduction"] = (rb - row["rate"]) / rb if rb > 0 else float("nan")
        for col in SINKNESS_COLUMNS:
            vals = [c[col] for c in cs if c.get(col) is not None]
            if vals:
                row[col] = float(np.mean(vals))
        rows.append(row)
    return rows
