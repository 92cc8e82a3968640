"""Comparison figures of several training runs (the figures of docs/training.md), from their ``metrics.jsonl``.

``python -m sinkscope.training.figures runs/ docs/img/`` writes one PNG per entry of :data:`FIGURES` whose runs
exist (``runs/NAME`` per experiment name): each figure is a row of panels, each panel one quantity of the
metrics rows over training steps, one line per run. A figure is data (run names and panels), not code.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _layer(key: str, layer: int) -> Callable[[Row], float | None]:
    """Per-layer metric ``row[key][layer]`` (heads averaged when it is a per-head list)."""

    def get(row: Row) -> float | None:
        if key not in row or len(row[key]) <= layer:
            return None
        v = row[key][layer]
        return _mean(v) if isinstance(v, list) else v

    return get


def _head_mass(head: str, cls: str) -> Callable[[Row], float | None]:
    """Attention mass of one head's queries of one class on the first token (plus any slot)."""
    return lambda row: row.get("head_bos_mass", {}).get(head, {}).get(cls)


def _max_head(key: str) -> Callable[[Row], float | None]:
    """The largest per-head value of a per-layer, per-head metric."""
    return lambda row: max(max(a) for a in row[key]) if key in row else None


@dataclass(frozen=True)
class Figure:
    """One comparison figure: the runs (experiment names) and the panels ``(title, row -> value)``."""

    runs: tuple[str, ...]
    panels: tuple[tuple[str, Callable[[Row], float | None]], ...]
    x: str = "step"
    log_y: tuple[str, ...] = ()


FIGURES: dict[str, Figure] = {
    "training-peak": Figure(
        ("bb-peak-adam", "bb-peak-sgd", "bb-peak-relu", "bb-peak-relu-flat", "bb-peak-relu-nobos"),
        (("BOS residual norm after layer 0", _layer("bos_residual_abs", 0)),
         ("BOS / median residual norm, layer 0", _layer("bos_residual_norm", 0)),
         ("BOS / median residual norm, layer 1", _layer("bos_residual_norm", 1)),
         ("attention on BOS, layer 1 (proxy)", _layer("bos_attention_proxy", 1)),
         ("eval loss", lambda r: r["loss"])),
        log_y=("BOS residual norm after layer 0", "BOS / median residual norm, layer 0",
               "BOS / median residual norm, layer 1", "eval loss")),
    "training-slots": Figure(
        ("bb-noslot-softmax", "bb-noslot-kbias", "bb-noslot-softmax1", "bb-noslot-sinktoken",
         "bb-noslot-sinktoken-long"),
        (("Sink_0 (first token)", lambda r: r["sink_ratio"]),
         ("Sink_slot", lambda r: r.get("sink_ratio_slot")),
         ("slot attention, layer 1", _layer("slot_attention", 1)),
         ("attention on first token, layer 1", _layer("bos_attention", 1)),
         ("copy loss", lambda r: r.get("loss_copy"))),
        log_y=("copy loss",)),
    "training-signorm": Figure(
        ("bb-signorm-len64", "bb-signorm-len32"),
        (("layer-1 attention on BOS, non-trigger queries", _head_mass("L1H0", "non_trigger")),
         ("layer-1 attention on BOS, trigger queries", _head_mass("L1H0", "trigger")),
         ("BOS / median value norm, layer 1", _layer("bos_value_norm", 1)),
         ("copy loss", lambda r: r.get("loss_copy"))),
        log_y=("copy loss",)),
    "training-text": Figure(
        ("lm-stdlib-softmax", "lm-stdlib-sigmoid"),
        (("eval loss (nats/byte)", lambda r: r["loss"]),
         ("Sink_0 (proxy)", lambda r: r["sink_ratio_proxy"]),
         ("largest head alpha_0 (proxy)", _max_head("bos_attention_proxy")),
         ("BOS / median value norm, layer 1", _layer("bos_value_norm", 1)))),
}


def read_rows(run: Path) -> list[Row]:
    """The rows of ``run/metrics.jsonl``."""
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def plot_figure(fig_spec: Figure, runs: dict[str, list[Row]], title: str = ""):
    """Draw one comparison figure (data -> matplotlib Figure, no I/O)."""
    from sinkscope.training.plots import plt

    n = len(fig_spec.panels)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.2))
    for ax, (panel_title, get) in zip(axes, fig_spec.panels):
        for i, (name, rows) in enumerate(runs.items()):  # one colour per run in every panel
            pts = [(r[fig_spec.x], get(r)) for r in rows]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.plot(*zip(*pts), label=name, lw=1.2, color=f"C{i}")
        ax.set_title(panel_title, fontsize=9)
        ax.set_xlabel(fig_spec.x, fontsize=8)
        ax.tick_params(labelsize=7)
        if panel_title in fig_spec.log_y:
            ax.set_yscale("log")
    handles = [plt.Line2D([], [], color=f"C{i}", label=name) for i, name in enumerate(runs)]
    axes[0].legend(handles=handles, fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def write_figures(runs_dir: Path, out_dir: Path, only: list[str] | None = None) -> list[Path]:
    """Write ``out_dir/NAME.png`` for every figure (or those in ``only``) with at least one finished run."""
    from sinkscope.io import save_figure_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, spec in FIGURES.items():
        if only and name not in only:
            continue
        runs = {r: read_rows(runs_dir / r) for r in spec.runs if (runs_dir / r / "metrics.jsonl").is_file()}
        if not runs:
            print(f"{name}: no runs yet, skipped", file=sys.stderr)
            continue
        save_figure_atomic(out_dir / f"{name}.png", plot_figure(spec, runs, title=name))
        written.append(out_dir / f"{name}.png")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sinkscope.training.figures", description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, help="folder of run directories (runs/NAME)")
    p.add_argument("out", type=Path, help="folder for the PNGs (e.g. docs/img)")
    p.add_argument("--only", nargs="*", help=f"figure names (default: all of {', '.join(FIGURES)})")
    args = p.parse_args(argv)
    for path in write_figures(args.runs, args.out, args.only):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
