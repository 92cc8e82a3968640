"""Results table of the training experiments: ``python -m sinkscope.training.table experiments/ runs/ [--run]``.

For every ``experiments/NAME.yaml`` it reads ``runs/NAME/final.json`` (``--run`` first trains the runs that have
none, one after the other; ``--skip-long`` leaves out those whose ``train.minutes`` is 5 or more) and prints a
Markdown table of the final metrics (long experiments are marked), then, for each ``X-adam`` / ``X-sgd`` and
``X-softmax`` / ``X-sigmoid`` pair, both runs at equal loss, a few rows of every run's dynamics (absolute residual
norms where logged), and for text runs Sink_0 every 500 steps.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from pathlib import Path
from typing import Any

from sinkscope.errors import SinkscopeError


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
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())


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


def results_table(experiments: Path, runs: Path, pattern: str = "*") -> str:
    """Markdown table of every experiment's final row (missing runs are listed as not run)."""
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
    return "\n".join(lines).rstrip() + "\n"


def _rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


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


def run_missing(experiments: Path, runs: Path, *, skip_long: bool = False, pattern: str = "*") -> None:
    """Train every experiment without ``final.json`` (resuming any checkpoint), one after the other;
    ``skip_long`` leaves out those expected to take 5 minutes or more (``train.minutes``)."""
    from sinkscope.training.config import load_config
    from sinkscope.training.loop import train

    for path in training_experiments(experiments, pattern):
        out = runs / path.stem
        if (out / "final.json").is_file():
            continue
        minutes = expected_minutes(path)
        if skip_long and minutes is not None and minutes >= LONG_MINUTES:
            print(f"skipping {path.stem} (long: ~{minutes:g} min)", file=sys.stderr, flush=True)
            continue
        print(f"training {path.stem}" + (f" (~{minutes:g} min on one core)" if minutes else "") + " ...",
              file=sys.stderr, flush=True)
        train(load_config(path), out, progress=sys.stderr.isatty(),
              argv=["sinkscope", "train", str(path), "--out", str(out)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sinkscope.training.table", description=__doc__.splitlines()[0])
    p.add_argument("experiments", type=Path, help="folder of experiment YAMLs")
    p.add_argument("runs", type=Path, help="folder of run directories (runs/NAME per experiments/NAME.yaml)")
    p.add_argument("--run", action="store_true", help="train the experiments that have no final.json first")
    p.add_argument("--skip-long", action="store_true",
                   help=f"with --run: leave out experiments expected to take {LONG_MINUTES:g} minutes or more")
    p.add_argument("--only", default="*", metavar="GLOB",
                   help="only the experiments whose name matches this pattern, e.g. 'bb-peak-*'")
    p.add_argument("--out", type=Path, help="also write the table to this file")
    args = p.parse_args(argv)
    try:
        if not args.experiments.is_dir():
            raise SinkscopeError(f"experiments folder not found: {args.experiments}")
        if args.run:
            run_missing(args.experiments, args.runs, skip_long=args.skip_long, pattern=args.only)
        table = results_table(args.experiments, args.runs, args.only)
    except SinkscopeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table, end="")
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
