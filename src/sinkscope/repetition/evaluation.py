"""What `repeat evaluate` runs: divergence with and without each patch (the grid, `sinkscope.repetition.grid`) and
what each patch does to text (`sinkscope.repetition.side_effects`), in one `Evaluation` that saves itself."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from sinkscope.errors import InputError
from sinkscope.interventions.patch import SinkPatch
from sinkscope.io import OutputLock, write_csv_atomic, write_json_atomic
from sinkscope.progress import ProgressCallback
from sinkscope.repetition.grid import NO_PATCH, GridPlan, GridResult, flat_rows, run_grid


@dataclass(frozen=True)
class EvaluationOptions:
    """What to measure besides the grid: ``text`` (KL / perplexity / Sink_0 on held-out ordinary text and the
    harm documents), ``divergence`` (the grid), at least one of them; ``batch_size``: rows per text forward."""

    text: bool = True
    divergence: bool = True
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not (self.text or self.divergence):
            raise InputError("nothing to do: --no-text with --no-divergence measures nothing", param="text")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be a positive integer, got {self.batch_size}", param="batch_size")


@dataclass
class Evaluation:
    """The grid's cells and summary (None with ``--no-divergence``), the side effects per patch (None with
    ``--no-text``), and the settings they ran under."""

    settings: dict[str, Any]
    grid: GridResult | None
    side_effects: dict[str, dict[str, Any]] | None
    elapsed_s: float

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"settings": self.settings}
        if self.grid is not None:
            d["summary"] = self.grid.summary()
        if self.side_effects is not None:
            d["side_effects"] = self.side_effects
        d["elapsed_s"] = self.elapsed_s
        return d

    def save(self, out_dir: str | Path) -> None:
        """``cells.csv`` + ``summary.csv`` (divergence), ``harm_<set>_<patch>.csv`` and
        ``harm_<set>_<patch>_documents.csv`` (text), ``evaluation.json`` (everything), atomically."""
        out = Path(out_dir)
        if self.grid is not None:
            self.grid.save(out)
        for name, se in (self.side_effects or {}).items():
            for hs, h in se["harm"].items():
                write_csv_atomic(out / f"harm_{hs}_{name}.csv", flat_rows(h["families"]))
                write_csv_atomic(out / f"harm_{hs}_{name}_documents.csv", flat_rows(h["documents"]))
        write_json_atomic(out / "evaluation.json", self.to_json())


def evaluate_patches(model: nn.Module, tokenizer: Any, patches: Mapping[str, SinkPatch], plan: GridPlan | None,
                     out_dir: str | Path, options: EvaluationOptions, *, text: str,
                     harm_sets: Mapping[str, Sequence[Any]], settings: dict[str, Any],
                     answer_settings: dict[str, Any] | None = None, progress: ProgressCallback | None = None,
                     lock: bool = True) -> Evaluation:
    """Run the grid of ``plan`` (variants: `NO_PATCH` and the names of ``patches``) into ``out_dir`` and measure
    each patch on the held-out sequences of ``text`` and on ``harm_sets``.

    Args:
        text: ordinary text (its `heldout_sequences` are measured); harm_sets: name -> harm documents.
        settings: the record of what was asked (written to evaluation.json as ``settings``).
        answer_settings: the grid's `sinkscope.repetition.grid.answer_settings`.
        lock: hold an `OutputLock` on ``out_dir`` (False: the caller holds it).
    """
    from sinkscope.repetition.corpus import heldout_sequences
    from sinkscope.repetition.side_effects import side_effects

    t0 = time.perf_counter()
    guard = OutputLock(out_dir).acquire() if lock else None
    try:
        grid = None
        if options.divergence:
            if plan is None:
                raise InputError("the divergence grid needs a plan")
            grid = run_grid(model, tokenizer, plan, {NO_PATCH: None, **patches}, out_dir, settings=answer_settings,
                            progress=progress, lock=False)
        effects = None
        if options.text:
            effects = side_effects(model, tokenizer, dict(patches), heldout_sequences(tokenizer, text),
                                   dict(harm_sets), batch_size=options.batch_size)
        result = Evaluation(settings, grid, effects, time.perf_counter() - t0)
        result.save(out_dir)
        return result
    finally:
        if guard is not None:
            guard.release()
