"""Comparison figures of several training runs: a figure file (e.g. ``experiments/figures.yaml``) and a folder of
runs in, one PNG per figure out (``sinkscope train figures FIGURES RUNS OUT``).

The figures themselves (which runs, which panels) are data in the figure file; they are drawn by
`sinkscope.viz.training.plot_comparison`. This module only reads the file and the runs' ``metrics.jsonl``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sinkscope.errors import InputError
from sinkscope.io import ensure_output_dir, read_jsonl, read_text_file, save_figure_atomic
from sinkscope.viz.training import ComparisonFigure, plot_comparison


def read_figure_specs(path: str | Path) -> dict[str, ComparisonFigure]:
    """The figures of a YAML figure file (``NAME: {runs: [...], panels: [...]}``, see `ComparisonFigure`).

    Raises:
        InputError: the file is missing, not UTF-8 text, not YAML, or a figure is malformed (one line).
    """
    text = read_text_file(path, "figure file")
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InputError(f"figure file {path} is not valid YAML: {str(e).strip().splitlines()[0]}") from None
    if not isinstance(d, dict) or not d:
        raise InputError(f"figure file {path}: expected a mapping of figure names to figures")
    return {str(name): ComparisonFigure.from_dict(str(name), spec) for name, spec in d.items()}


@dataclass
class FiguresResult:
    """What `write_figures` did: the PNGs written and the figures skipped (no finished run yet)."""

    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def write_figures(specs: dict[str, ComparisonFigure], runs_dir: str | Path, out_dir: str | Path,
                  only: list[str] | None = None) -> FiguresResult:
    """Write ``out_dir/NAME.png`` for every figure (or those named in ``only``) with at least one run that has a
    ``runs_dir/RUN/metrics.jsonl``; figures without any are skipped.

    Raises:
        InputError: a name in ``only`` is not a figure of ``specs``; ``out_dir`` cannot be created.
    """
    unknown = sorted(set(only or []) - set(specs))
    if unknown:
        raise InputError(f"unknown figure(s) {', '.join(unknown)}; the figures are {', '.join(specs)}")
    ensure_output_dir(out_dir)
    result = FiguresResult()
    for name, spec in specs.items():
        if only and name not in only:
            continue
        runs = {r: read_jsonl(Path(runs_dir) / r / "metrics.jsonl") for r in spec.runs}
        runs = {r: rows for r, rows in runs.items() if rows}
        if not runs:
            result.skipped.append(name)
            continue
        path = Path(out_dir) / f"{name}.png"
        save_figure_atomic(path, plot_comparison(spec, runs, title=name))
        result.written.append(path)
    return result
