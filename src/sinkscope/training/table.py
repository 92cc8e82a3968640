"""Results table of the training experiments: ``python -m sinkscope.training.table experiments/ runs/ [--run]``.

For every ``experiments/NAME.yaml`` it reads ``runs/NAME/final.json`` (``--run`` first trains the runs that have
none, one after the other) and prints a Markdown table of the final metrics, plus, for each ``X-adam`` /
``X-sgd`` pair, the residual norms of both at equal loss.
"""

from __future__ import annotations

import argparse
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


def _cfg(run: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())


def training_experiments(experiments: Path) -> list[Path]:
    """The YAML files of ``experiments`` that are training configs (top-level keys among base/model/data/optim/
    train); other experiment files in the folder (e.g. scripts' configs) are skipped."""
    from sinkscope.training.config import SECTIONS, ConfigError, read_yaml_tree

    out = []
    for path in sorted(experiments.glob("*.yaml")):
        try:
            keys = set(read_yaml_tree(path))
        except ConfigError:
            continue
        if keys and keys <= set(SECTIONS):
            out.append(path)
    return out


def results_table(experiments: Path, runs: Path) -> str:
    """Markdown table of every experiment's final row (missing runs are listed as not run)."""
    header = ("| experiment | attention | optim | steps | eval loss | excess | Sink_0 | Sink_0 proxy | Sink_slot "
              "| BOS attn (per layer) | BOS value / median | BOS resid / median | dormant heads | wall s |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for path in training_experiments(experiments):
        run = runs / path.stem
        if not (run / "final.json").is_file():
            lines.append(f"| {path.stem} | (not run) |" + " |" * (header.count("|") - 3))
            continue
        f = json.loads((run / "final.json").read_text())
        c = _cfg(run)
        m, o = c["model"], c["optim"]
        att = m["attention"] + (f"+{m['attn_bias']}-bias" if m["attn_bias"] != "none" else "") + \
            ("+sink-token" if m["sink_token"] else "")
        slot = f"{f['sink_ratio_slot']:.2f}" if "sink_ratio_slot" in f else "-"
        excess = f"{f['excess_loss']:.3f}" if "excess_loss" in f else "-"
        lines.append(
            f"| {path.stem} | {att} | {o['name']} lr {o['lr']:g} | {f['step']} | {f['loss']:.3f} | {excess} "
            f"| {f['sink_ratio']:.2f} | {f['sink_ratio_proxy']:.2f} | {slot} | {_fmt_layers(f['bos_attention'])} "
            f"| {_fmt_layers(f['bos_value_norm'])} | {_fmt_layers(f['bos_residual_norm'])} | {_dormant(f)} "
            f"| {f['wall_time_s']:.0f} |")
    lines += ["", *equal_loss_lines(experiments, runs), *dynamics_lines(experiments, runs)]
    return "\n".join(lines).rstrip() + "\n"


def _rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def equal_loss_lines(experiments: Path, runs: Path) -> list[str]:
    """For each ``X-adam`` / ``X-sgd`` pair: Adam's first row whose loss is at most SGD's final loss, side by side."""
    out = []
    for sgd in sorted(experiments.glob("*-sgd.yaml")):
        adam = experiments / sgd.name.replace("-sgd", "-adam")
        ra, rs = runs / adam.stem, runs / sgd.stem
        if not (adam.is_file() and (ra / "metrics.jsonl").is_file() and (rs / "final.json").is_file()):
            continue
        s_final = _rows(rs)[-1]
        match = next((r for r in _rows(ra) if r["loss"] <= s_final["loss"]), None)
        if match is None:
            continue
        out += [f"Equal loss ({adam.stem} vs {sgd.stem}): loss {match['loss']:.3f} at Adam step {match['step']} vs "
                f"{s_final['loss']:.3f} at SGD step {s_final['step']}; BOS residual / median per layer: Adam "
                f"{_fmt_layers(match['bos_residual_norm'])}, SGD {_fmt_layers(s_final['bos_residual_norm'])}; "
                f"BOS value / median: Adam {_fmt_layers(match['bos_value_norm'])}, SGD "
                f"{_fmt_layers(s_final['bos_value_norm'])}; Sink_0: Adam {match['sink_ratio']:.2f}, SGD "
                f"{s_final['sink_ratio']:.2f}.", ""]
    return out


def dynamics_lines(experiments: Path, runs: Path, points: int = 5) -> list[str]:
    """Per experiment, a few evenly spaced rows: max-over-heads attention on the first token, value and residual
    ratios, per layer (``a / b`` = layer 0 / layer 1)."""
    out = ["| experiment | step | eval loss | Sink_0 (proxy) | max BOS attn per layer | BOS value / median "
           "| BOS resid / median |", "|---|---|---|---|---|---|---|"]
    for path in training_experiments(experiments):
        run = runs / path.stem
        if not (run / "final.json").is_file():
            continue
        rows = _rows(run)
        picks = sorted({round(i * (len(rows) - 1) / (points - 1)) for i in range(points)})
        for i in picks:
            r = rows[i]
            attn = " / ".join(f"{max(a):.2f}" for a in r["bos_attention_proxy"])
            out.append(f"| {path.stem} | {r['step']} | {r['loss']:.3f} | {r['sink_ratio_proxy']:.2f} | {attn} "
                       f"| {_fmt_layers(r['bos_value_norm'])} | {_fmt_layers(r['bos_residual_norm'])} |")
    return out if len(out) > 2 else []


def run_missing(experiments: Path, runs: Path) -> None:
    """Train every experiment without ``final.json`` (resuming any checkpoint), one after the other."""
    from sinkscope.training.config import load_config
    from sinkscope.training.loop import train

    for path in training_experiments(experiments):
        out = runs / path.stem
        if (out / "final.json").is_file():
            continue
        print(f"training {path.stem} ...", file=sys.stderr, flush=True)
        train(load_config(path), out, progress=sys.stderr.isatty(),
              argv=["sinkscope", "train", str(path), "--out", str(out)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sinkscope.training.table", description=__doc__.splitlines()[0])
    p.add_argument("experiments", type=Path, help="folder of experiment YAMLs")
    p.add_argument("runs", type=Path, help="folder of run directories (runs/NAME per experiments/NAME.yaml)")
    p.add_argument("--run", action="store_true", help="train the experiments that have no final.json first")
    p.add_argument("--out", type=Path, help="also write the table to this file")
    args = p.parse_args(argv)
    try:
        if not args.experiments.is_dir():
            raise SinkscopeError(f"experiments folder not found: {args.experiments}")
        if args.run:
            run_missing(args.experiments, args.runs)
        table = results_table(args.experiments, args.runs)
    except SinkscopeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table, end="")
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
