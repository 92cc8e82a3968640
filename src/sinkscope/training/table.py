"""Results table of the training experiments: ``sinkscope train table experiments/ runs/ [--run]``.

For every ``experiments/NAME.yaml`` it reads ``runs/NAME/final.json`` (`missing_runs` lists the runs that have
none, which ``--run`` trains first, one after the other; ``--skip-long`` leaves out those whose
``train.minutes`` is 5 or more) and makes a Markdown table of the final metrics (long experiments are marked), then,
for each ``X-adam`` / ``X-sgd`` and
``X-softmax`` / ``X-sigmoid`` pair, both runs at equal loss, a few rows of every run's dynamics (absolute residual
norms where logged), and for text runs Sink_0 every 500 steps.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sinkscope.errors import InputError
from sinkscope.io import read_jsonl, read_text_file, write_atomic


def _fmt_layers(values: list[Any]) -> str:
    out = []
    for v in values:
        if isinstance(v, list):
            v = sum(v) / len(v)
        out.append(f"{v:.2f}")
    return " / ".join(out)


def _dormant(final: dict[str, Any]) -> str:
    heads = final.get("heads", {})
    classes = sorted({c for labels in heads.values() for c in labels})
    return ", ".join(f"{c}: {sum(labels.get(c) == 'dormant' for labels in heads.values())}/{len(heads)}"
                     for c in classes)


LONG_MINUTES = 5.0
#: name suffixes compared at equal loss: (reference, other)
EQUAL_LOSS_PAIRS = (("-adam", "-sgd"), ("-softmax", "-sigmoid"))


def expected_minutes(path: Path) -> float | None:
    """``train.minutes`` of an experiment YAML (its expected wall time on one core), or None."""
    from sinkscope.training.config import load_config

    return load_config(path).train.minutes


def _name(path: Path) -> str:
    minutes = expected_minutes(path)
    return f"{path.stem} (long, ~{minutes:g} min)" if minutes is not None and minutes >= LONG_MINUTES else path.stem


def _cfg(run: Path) -> dict[str, Any]:
    return yaml.safe_load(read_text_file(run / "config.yaml", "run config"))


def training_experiments(experiments: Path, pattern: str = "*") -> list[Path]:
    """The YAML files of ``experiments`` that are training configs (top-level keys among base/model/data/optim/
    train); other experiment files in the folder (e.g. scripts' configs) are skipped."""
    from sinkscope.training.config import SECTIONS, ConfigError, read_yaml_tree

    out = []
    for path in sorted(experiments.glob(f"{pattern}.yaml")):
        try:
            keys = set(read_yaml_tree(path))
        except ConfigError:
            continue
        if keys and keys <= set(SECTIONS):
            out.append(path)
    return out


@dataclass(frozen=True)
class ResultsTable:
    """The results of a folder of experiments as Markdown: the final-row table, the equal-loss pairs, the
    dynamics rows and the text runs' sink trend (see the module docstring)."""

    markdown: str

    def save(self, path: str | Path) -> Path:
        """Write the Markdown to the file ``path`` (atomically; its folder must exist). Returns ``path``."""
        write_atomic(path, self.markdown)
        return Path(path)


def results_table(experiments: Path, runs: Path, pattern: str = "*") -> ResultsTable:
    """Markdown table of every experiment's final row (missing runs are listed as not run), then the other
    sections (`ResultsTable`).

    Raises:
        InputError: ``experiments`` is not a folder.
    """
    experiments, runs = Path(experiments), Path(runs)
    if not experiments.is_dir():
        raise InputError(f"experiments folder not found: {experiments}")
    header = ("| experiment | attention | optim | steps | eval loss | excess | Sink_0 | Sink_0 proxy | Sink_slot "
              "| BOS attn (per layer) | BOS value / median | BOS resid / median | dormant heads | wall s |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for path in training_experiments(experiments, pattern):
        run = runs / path.stem
        if not (run / "final.json").is_file():
            lines.append(f"| {_name(path)} | (not run) |" + " |" * (header.count("|") - 3))
            continue
        f = json.loads((run / "final.json").read_text())
        c = _cfg(run)
        m, o = c["model"], c["optim"]
        att = m["attention"] + (f"+{m['attn_bias']}-bias" if m["attn_bias"] != "none" else "") + \
            ("+sink-token" if m["sink_token"] else "")
        slot = f"{f['sink_ratio_slot']:.2f}" if "sink_ratio_slot" in f else "-"
        excess = f"{f['excess_loss']:.3f}" if "excess_loss" in f else "-"
        lines.append(
            f"| {_name(path)} | {att} | {o['name']} lr {o['lr']:g} | {f['step']} | {f['loss']:.3f} | {excess} "
            f"| {f['sink_ratio']:.2f} | {f['sink_ratio_proxy']:.2f} | {slot} | {_fmt_layers(f['bos_attention'])} "
            f"| {_fmt_layers(f['bos_value_norm'])} | {_fmt_layers(f['bos_residual_norm'])} | {_dormant(f)} "
            f"| {f['wall_time_s']:.0f} |")
    lines += ["", *equal_loss_lines(experiments, runs, pattern), *dynamics_lines(experiments, runs, pattern=pattern),
              *text_sink_lines(experiments, runs, pattern=pattern)]
    return ResultsTable("\n".join(lines).rstrip() + "\n")


def _rows(run: Path) -> list[dict[str, Any]]:
    return read_jsonl(run / "metrics.jsonl")


def _describe(label: str, r: dict[str, Any]) -> str:
    text = (f"{label} step {r['step']}: Sink_0 {r['sink_ratio']:.2f} (proxy {r['sink_ratio_proxy']:.2f}), "
            f"BOS residual / median {_fmt_layers(r['bos_residual_norm'])}")
    if "bos_residual_abs" in r:
        text += f" (absolute {_fmt_layers(r['bos_residual_abs'])} vs median {_fmt_layers(r['median_residual_abs'])})"
    return text + f", BOS value / median {_fmt_layers(r['bos_value_norm'])}"


def equal_loss(a_rows: list[dict[str, Any]], b_rows: list[dict[str, Any]]) -> tuple[dict, dict]:
    """Match two runs at equal evaluation loss: the final row of the run whose final loss is higher, and the
    first row of the other run whose loss is at most that (rows ``a``, ``b`` in the order of the arguments)."""
    a_final, b_final = a_rows[-1], b_rows[-1]
    if a_final["loss"] >= b_final["loss"]:
        return a_final, next(r for r in b_rows if r["loss"] <= a_final["loss"])
    return next(r for r in a_rows if r["loss"] <= b_final["loss"]), b_final


def equal_loss_lines(experiments: Path, runs: Path, pattern: str = "*") -> list[str]:
    """For each ``X-adam`` / ``X-sgd`` (and ``X-softmax`` / ``X-sigmoid``) pair: both runs at equal loss (the
    slower run's final row against the faster run's first row reaching that loss), side by side."""
    out = []
    for ref_suffix, other_suffix in EQUAL_LOSS_PAIRS:
        for other in sorted(experiments.glob(f"*{other_suffix}.yaml")):
            ref = experiments / (other.stem.removesuffix(other_suffix) + ref_suffix + ".yaml")
            ra, ro = runs / ref.stem, runs / other.stem
            if not fnmatch.fnmatch(other.stem, pattern) or not fnmatch.fnmatch(ref.stem, pattern):
                continue
            if not (ref.is_file() and (ra / "final.json").is_file() and (ro / "final.json").is_file()):
                continue
            a, b = equal_loss(_rows(ra), _rows(ro))
            out += [f"Equal loss ({ref.stem} vs {other.stem}): loss {a['loss']:.3f} vs {b['loss']:.3f}; "
                    f"{_describe(ref_suffix[1:], a)}; {_describe(other_suffix[1:], b)}.", ""]
    return out


def dynamics_lines(experiments: Path, runs: Path, points: int = 5, pattern: str = "*") -> list[str]:
    """Per experiment, a few evenly spaced rows: max-over-heads attention on the first token, value and residual
    ratios, per layer (``a / b`` = layer 0 / layer 1)."""
    out = ["| experiment | step | eval loss | Sink_0 (proxy) | max BOS attn per layer | BOS value / median "
           "| BOS resid / median | BOS resid absolute |", "|---|---|---|---|---|---|---|---|"]
    for path in training_experiments(experiments, pattern):
        run = runs / path.stem
        if not (run / "final.json").is_file():
            continue
        rows = _rows(run)
        picks = sorted({round(i * (len(rows) - 1) / (points - 1)) for i in range(points)})
        for i in picks:
            r = rows[i]
            attn = " / ".join(f"{max(a):.2f}" for a in r["bos_attention_proxy"])
            absolute = _fmt_layers(r["bos_residual_abs"]) if "bos_residual_abs" in r else "-"
            out.append(f"| {path.stem} | {r['step']} | {r['loss']:.3f} | {r['sink_ratio_proxy']:.2f} | {attn} "
                       f"| {_fmt_layers(r['bos_value_norm'])} | {_fmt_layers(r['bos_residual_norm'])} | {absolute} |")
    return out if len(out) > 2 else []


def text_sink_lines(experiments: Path, runs: Path, every: int = 500, pattern: str = "*") -> list[str]:
    """For text-task runs: eval loss, Sink_0 (proxy) and the largest per-head attention on the first token
    (proxy) at every ``every`` steps."""
    out = []
    for path in training_experiments(experiments, pattern):
        run = runs / path.stem
        if not (run / "final.json").is_file() or _cfg(run)["data"]["task"] != "text":
            continue
        rows = [r for r in _rows(run) if r["step"] % every == 0]
        if len(rows) < 3:
            continue
        cells = [f"{r['step']}: {r['loss']:.2f} / {r['sink_ratio_proxy']:.2f} / "
                 f"{max(max(a) for a in r['bos_attention_proxy']):.2f}" for r in rows]
        out.append(f"- {path.stem} (step: loss / Sink_0 proxy / max head alpha_0): " + "; ".join(cells))
    return ["", *out] if out else []


@dataclass(frozen=True)
class MissingRun:
    """An experiment without ``final.json``: its YAML, its run directory, its expected minutes (or None) and
    whether ``skip_long`` leaves it out."""

    config: Path
    out: Path
    minutes: float | None
    skipped: bool

    @property
    def name(self) -> str:
        return self.config.stem


def missing_runs(experiments: Path, runs: Path, *, skip_long: bool = False, pattern: str = "*") -> list[MissingRun]:
    """Every experiment of ``experiments`` (matching ``pattern``) whose ``runs/NAME/final.json`` is missing, in
    name order; with ``skip_long`` those expected to take 5 minutes or more (``train.minutes``) are marked
    ``skipped``. ``sinkscope train table --run`` trains the others one after the other (resuming any
    checkpoint) with `sinkscope.training.loop.train`.

    Raises:
        InputError: ``experiments`` is not a folder.
    """
    experiments, runs = Path(experiments), Path(runs)
    if not experiments.is_dir():
        raise InputError(f"experiments folder not found: {experiments}")
    out = []
    for path in training_experiments(experiments, pattern):
        if (runs / path.stem / "final.json").is_file():
            continue
        minutes = expected_minutes(path)
        out.append(MissingRun(path, runs / path.stem, minutes,
                              skip_long and minutes is not None and minutes >= LONG_MINUTES))
    return out
