"""Divergence scan: words x repetition lengths x prompt forms, greedy continuations, verdicts and run sinkness.

Cells ``(word, n, form)`` are written one JSON line each to ``cells.jsonl`` as soon as their batch finishes, so an
interrupted scan resumes without redoing finished cells. `summarise` turns the cells into divergence rates.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from sinkscope.errors import InputError
from sinkscope.models.adapters import get_adapter
from sinkscope.repetition.generate import greedy_continue
from sinkscope.repetition.sinkness import run_sinkness
from sinkscope.tasks.repeated_tokens import build_prompt, check_form, detect_divergence, run_token_id

CELLS_FILE = "cells.jsonl"


@dataclass(frozen=True)
class ScanPlan:
    """What to scan. ``sinkness_words``: words whose runs get the layer-by-layer sinkness pass (one extra forward
    per cell; None = all words)."""

    words: list[str]
    lengths: list[int]
    forms: list[str]
    max_new_tokens: int = 24
    batch_size: int = 8
    sinkness_words: list[str] | None = None

    def validate(self, tokenizer: Any, max_positions: int | None) -> None:
        if not self.words:
            raise InputError("no words to scan")
        if not self.lengths or min(self.lengths) < 1:
            raise InputError("repetition lengths must be positive integers")
        for f in self.forms:
            check_form(f)
        for w in self.words:
            run_token_id(tokenizer, w)  # InputError for multi-token words
        if self.max_new_tokens < 1:
            raise InputError("max_new_tokens must be positive")
        for f in self.forms:  # the longest prompt must fit
            build_prompt(tokenizer, max(self.words, key=len), max(self.lengths), f, max_positions=max_positions,
                         reserve=self.max_new_tokens)


def cell_key(word: str, n: int, form: str) -> str:
    return f"{form}\t{n}\t{word}"


def read_cells(out_dir: str | Path) -> list[dict[str, Any]]:
    """Finished cells of a (possibly interrupted) scan."""
    p = Path(out_dir) / CELLS_FILE
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by an interruption
    return rows


def scan_repetition(model: nn.Module, tokenizer: Any, plan: ScanPlan, out_dir: str | Path, *,
                    on_cells: Callable[[int, int], None] | None = None,
                    on_batch: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run every unfinished cell of ``plan``, appending to ``out_dir/cells.jsonl``; returns all cells of the plan.

    Each ``generate`` call runs ``plan.batch_size`` prompts of equal length; the remainders of the length groups
    are pooled into padded batches (`sinkscope.repetition.protocol.equal_length_batches`). ``on_cells(done, total)`` reports progress (cells done include those found
    from an earlier run); ``on_batch(what)`` says what the next batch holds.
    """
    a = get_adapter(model)
    plan.validate(tokenizer, a.max_positions)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = {cell_key(c["word"], c["n"], c["form"]): c for c in read_cells(out)}
    todo = [(f, n, w) for f in plan.forms for n in plan.lengths for w in plan.words
            if cell_key(w, n, f) not in done]
    total = len(plan.forms) * len(plan.lengths) * len(plan.words)
    n_done = total - len(todo)
    if on_cells is not None:
        on_cells(n_done, total)
    sink_words = set(plan.words if plan.sinkness_words is None else plan.sinkness_words)
    from sinkscope.repetition.protocol import equal_length_batches

    pending = [build_prompt(tokenizer, w, n, f, max_positions=a.max_positions, reserve=plan.max_new_tokens)
               for f, n, w in todo]
    with open(out / CELLS_FILE, "a", encoding="utf-8") as fh:
        for prompts in equal_length_batches(pending, plan.batch_size):
            group = prompts
            if on_batch is not None:
                lens = sorted({p.length for p in prompts})
                on_batch(f"{len(prompts)} rows of {lens[0]} tokens" if len(lens) == 1
                         else f"{len(prompts)} rows of {lens[0]}-{lens[-1]} tokens")
            outs = greedy_continue(model, [p.ids for p in prompts], max_new_tokens=plan.max_new_tokens,
                                   batch_size=plan.batch_size)
            for p, o in zip(prompts, outs):
                v = detect_divergence(tokenizer, p.word, o)
                row: dict[str, Any] = {"word": p.word, "n": p.n, "form": p.form, "token_id": p.token_id,
                                       "prompt_tokens": p.length, "diverged": v.diverged, "at": v.at,
                                       "emitted": v.emitted[:200],
                                       "continuation": tokenizer.decode(o, skip_special_tokens=True)[:200]}
                if p.word in sink_words:
                    s = run_sinkness(model, p.ids, p.run_start)
                    row.update(s.summary())
                    row["sinkness"] = s.to_json()
                fh.write(json.dumps(row) + "\n")
                fh.flush()
                done[cell_key(p.word, p.n, p.form)] = row
            n_done += len(group)
            if on_cells is not None:
                on_cells(n_done, total)
    return [done[cell_key(w, n, f)] for f in plan.forms for n in plan.lengths for w in plan.words]


def summarise(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Divergence rate (and mean run sinkness where measured) per (form, n)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["form"], int(c["n"])), []).append(c)
    rows = []
    for (form, n), cs in sorted(groups.items()):
        row: dict[str, Any] = {"form": form, "n": n, "words": len(cs),
                               "diverged": int(sum(c["diverged"] for c in cs)),
                               "rate": float(np.mean([c["diverged"] for c in cs]))}
        for k in ("alpha_run_max", "norm_ratio_max", "cos_first_max", "neuron_ratio_max", "sink_share_max"):
            vals = [c[k] for c in cs if k in c]
            if vals:
                row[k] = float(np.mean(vals))
        rows.append(row)
    return rows
