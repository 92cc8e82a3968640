"""`sinkscope train`: train a tinygpt and record sink dynamics (`run`, also `sinkscope train CONFIG ...`), and read
finished runs: the results `table`, the comparison `figures`, a `diagnose` of one layer, a sink `profile`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup


class _TrainGroup(TyperGroup):
    """``sinkscope train CONFIG ...`` (no subcommand name, options in any place) is ``sinkscope train run ...``."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in self.get_help_option_names(ctx):
            args = ["run", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(cls=_TrainGroup, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Train a small transformer and record sink dynamics (`sinkscope train CONFIG --out DIR` is "
                       "`sinkscope train run ...`); read finished runs with table, figures, diagnose, profile, "
                       "reinforcement.")


@app.command("run")
def run_command(
    config: Path = typer.Argument(..., help="Run config YAML (may name a `base:` file)."),
    out: Path = typer.Option(..., "--out", help="Output directory; an existing checkpoint there is resumed."),
    overrides: list[str] | None = typer.Argument(None, help="Dotted overrides, e.g. model.attention=relu "
                                                               "optim.lr=1e-3"),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore an existing checkpoint in --out and start over."),
) -> None:
    """Train a small transformer (Bigram-Backcopy or text) and write config.yaml, metrics.jsonl, final.json, plots.

    Rerunning the same command resumes from the last checkpoint (it says from which step); Ctrl-C exits with
    status 130. `train.max_minutes=M` stops cleanly after M minutes (evaluated, checkpointed, final.json written).
    Progress goes to standard error: a bar on a terminal, a line every 10 s (step, rate, time left) in a log.
    Runs unchanged under `torchrun --nproc_per_node N -m sinkscope.cli train ...` (DDP: gloo on CPU, nccl on GPU).
    """
    from sinkscope.progress import ProgressReporter
    from sinkscope.training.config import load_config
    from sinkscope.training.loop import train

    cfg = load_config(config, list(overrides or []))
    # Ctrl-C: the last checkpoint (every train.ckpt_every steps, atomic) is intact; the CLI's entry point says
    # "interrupted; resume with the same command" and exits 130
    argv = ["sinkscope", "train", *sys.argv[2:]]
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports (the loop reports on rank 0)
        train(cfg, out, resume=not fresh, argv=argv)
        return
    with ProgressReporter("train", unit="steps") as report:
        result = train(cfg, out, resume=not fresh, progress=report, log=report.message, argv=argv)
    if result is not None:
        f = result.final
        keys = ("step", "loss", "excess_loss", "sink_ratio", "sink_ratio_proxy", "sink_ratio_slot", "wall_time_s")
        print(json.dumps({k: f[k] for k in keys if k in f}))
        names = [n for n in ("config.yaml", "metrics.jsonl", "final.json", "dynamics.png") if (out / n).is_file()]
        print(f"wrote {out}/: {', '.join(names)}")


@app.command("table")
def table_command(
    experiments: Path = typer.Argument(..., help="Folder of experiment YAMLs (e.g. experiments/)."),
    runs: Path = typer.Argument(..., help="Folder of run directories (runs/NAME per experiments/NAME.yaml)."),
    run: bool = typer.Option(False, "--run", help="Train the experiments that have no final.json first."),
    skip_long: bool = typer.Option(False, "--skip-long", help="With --run: leave out experiments expected to take "
                                                              "5 minutes or more (train.minutes)."),
    only: str = typer.Option("*", "--only", metavar="GLOB", help="Only the experiments whose name matches, e.g. "
                                                                 "'bb-peak-*'."),
    out: Path | None = typer.Option(None, "--out", help="Also write the table to this file."),
) -> None:
    """Print a Markdown table of the experiments' final metrics, equal-loss pairs and dynamics."""
    from sinkscope.io import check_output_dir
    from sinkscope.progress import ProgressReporter
    from sinkscope.training.config import load_config
    from sinkscope.training.loop import train
    from sinkscope.training.table import missing_runs, results_table

    if out is not None:
        check_output_dir(out.parent)
    if run:
        for missing in missing_runs(experiments, runs, skip_long=skip_long, pattern=only):
            if missing.skipped:
                print(f"skipping {missing.name} (long: ~{missing.minutes:g} min)", file=sys.stderr, flush=True)
                continue
            print(f"training {missing.name}" + (f" (~{missing.minutes:g} min on one core)" if missing.minutes else "")
                  + " ...", file=sys.stderr, flush=True)
            with ProgressReporter(f"train {missing.name}", unit="steps") as report:
                train(load_config(missing.config), missing.out, progress=report, log=report.message,
                      argv=["sinkscope", "train", str(missing.config), "--out", str(missing.out)])
    table = results_table(experiments, runs, only)
    print(table.markdown, end="")
    if out is not None:
        table.save(out)


@app.command("figures")
def figures_command(
    runs: Path = typer.Argument(..., help="Folder of run directories (runs/NAME)."),
    out: Path = typer.Argument(..., help="Folder for the PNGs (e.g. docs/img)."),
    figures: Path = typer.Option(Path("experiments/figures.yaml"), "--figures",
                                 help="The figure file: which runs and panels each figure shows."),
    only: list[str] | None = typer.Option(None, "--only", help="A figure name (repeat for several; default: "
                                                                  "all of the figure file)."),
) -> None:
    """Draw the comparison figures of the figure file from the runs that exist, one PNG per figure."""
    from sinkscope.io import check_output_dir
    from sinkscope.training.figures import read_figure_specs, write_figures

    specs = read_figure_specs(figures)
    check_output_dir(out)
    result = write_figures(specs, runs, out, only)
    for name in result.skipped:
        print(f"{name}: no runs yet, skipped", file=sys.stderr)
    for path in result.written:
        print(path)


@app.command("reinforcement")
def reinforcement_command(
    run: Path = typer.Argument(..., help="Run directory of `sinkscope train` (its metrics.jsonl)."),
    out: Path = typer.Option(..., "--out", help="Folder for reinforcement.json and reinforcement.png."),
    layer: int | None = typer.Option(None, "--layer", help="Layer of the head (default: the sink head, the one "
                                                              "whose queries put the most attention on BOS)."),
    head: int | None = typer.Option(None, "--head", help="Head in that layer (default: as --layer)."),
    query_class: str = typer.Option("non_trigger", "--class", help="Query class averaged over."),
    from_step: int | None = typer.Option(None, "--from-step", help="Fit from this step (default: the head's "
                                                                     "dormant onset)."),
) -> None:
    """Guo et al.'s mutual reinforcement: the sink head's logit gap on BOS against ln(step) (slope, R^2) and BOS's
    value norm over training (sinkscope.training.metrics.reinforcement_dynamics)."""
    from sinkscope.io import check_output_dir
    from sinkscope.training.metrics import run_reinforcement

    check_output_dir(out)
    d = run_reinforcement(run, layer=layer, head=head, query_class=query_class, from_step=from_step)
    f = d.fit
    print(json.dumps({"head": f"L{d.layer}H{d.head}", "onset_step": d.onset_step, "slope": round(f.slope, 4),
                      "r2": round(f.r2, 4), "linear_r2": round(d.linear_r2, 4),
                      "fit_steps": [f.first_step, f.last_step],
                      "value_out_norm": [d.value_start, d.value_end]}))
    for path in d.save(out):
        print(path)


@app.command("diagnose")
def diagnose_command(
    what: str = typer.Argument(..., help="scores (raw attention scores on the first token vs the rest), parts (the "
                                         "first token's residual parts) or targets (where the attention goes)."),
    runs: list[Path] = typer.Argument(..., help="Run directories of `sinkscope train`."),
    layer: int | None = typer.Option(None, "--layer", help="Layer (default: 1 for scores and targets, 0 for "
                                                              "parts)."),
) -> None:
    """Why a trained head does (not) sink: one JSON line per run (see sinkscope.training.diagnose)."""
    from sinkscope.errors import InputError
    from sinkscope.training.diagnose import DIAGNOSES, diagnose_run

    if what not in DIAGNOSES:
        raise InputError(f"unknown diagnosis {what!r}; choose from {', '.join(DIAGNOSES)}")
    for run in runs:
        print(json.dumps(diagnose_run(what, run, layer)))


@app.command("profile")
def profile_command(
    runs: list[Path] = typer.Argument(..., help="Run directories of `sinkscope train`."),
    samples: int = typer.Option(32, "--samples", help="Held-out task sequences per run (seed 1234, step 0)."),
) -> None:
    """Profile trained runs on task sequences: Sink_0 from the weights used and from the proxy, Sink_* and the
    per-layer first-token attention, value and residual ratios (one line per run)."""
    from sinkscope.training.run import profile_run

    def r3(xs: list[float]) -> list[float]:
        return [round(x, 3) for x in xs]

    for run in runs:
        s = profile_run(run, samples)
        slot = "" if "sink_ratio_slot" not in s else (
            f" Sink_* {s['sink_ratio_slot']:.3f} (proxy {s['sink_ratio_slot_proxy']:.3f}),"
            f" slot mass by layer {r3(s['learned_sink_mass_by_layer'])};")
        print(f"{run}: {s['attention']}, attn_bias {s['attn_bias']}: Sink_0 {s['sink_ratio']:.3f}"
              f" (proxy {s['sink_ratio_proxy']:.3f}); alpha_0 by layer {r3(s['attention_on_first_by_layer'])}"
              f" (proxy {r3(s['attention_on_first_by_layer_proxy'])});{slot} value ratio"
              f" {r3(s['value_ratio_first_by_layer'])}, residual ratio {r3(s['residual_ratio_first_by_layer'])}")


@app.command("positions")
def positions_command(
    out: Path = typer.Argument(..., help="Output folder (positions.json)."),
    runs: list[Path] = typer.Argument(..., help="Run directories (checkpoint.pt, optional snapshots/*.pt)."),
    rows: int = typer.Option(96, "--rows", help="Held-out rows probed per checkpoint."),
    fixed_pos: int = typer.Option(8, "--fixed-pos", help="Position j of the fixed-token probe."),
    fixed_token: int = typer.Option(0, "--fixed-token", help="Token id of the fixed-token probe."),
    every: int = typer.Option(1000, "--every", help="Probe checkpoints whose step is a multiple of this (and the "
                                                   "last)."),
    eps: float = typer.Option(0.3, "--eps", help="Sink threshold of Sink_k^eps."),
    figure: Path | None = typer.Option(None, "--figure", help="Also draw the figure to this PNG."),
    figure_only: bool = typer.Option(False, "--figure-only", help="Draw the figure from OUT/positions.json; no "
                                                                  "probing."),
) -> None:
    """Where the sink sits (Gu et al.'s Table 10 probes): Sink_k and the strongest head's alpha_k at every key
    position, on held-out rows as they are, with a random token at 0 and with a fixed token at j, over each run's
    checkpoints (see sinkscope.training.positions)."""
    from sinkscope.errors import InputError
    from sinkscope.io import check_output_dir, read_text_file, save_figure_atomic
    from sinkscope.training.config import load_config
    from sinkscope.training.positions import own_probe, positions_figure, probe_checkpoints

    for run in runs:
        if not (run / "config.yaml").is_file():
            raise InputError(f"{run} is not a run directory of `sinkscope train` (no config.yaml)")
    if figure_only and figure is None:
        raise InputError("--figure-only needs --figure PNG", param="figure")
    if not figure_only:
        check_output_dir(out)
    own = {run.name: own_probe(load_config(run / "config.yaml")) for run in runs}
    if not figure_only:
        res = probe_checkpoints([str(r) for r in runs], n_rows=rows, fixed_pos=fixed_pos, fixed_token=fixed_token,
                                every=every, eps=eps)
        print(f"wrote {res.save(str(out))}")
    if figure is not None:
        data = json.loads(read_text_file(out / "positions.json", "positions file"))
        save_figure_atomic(figure, positions_figure(data, own, title="Gu et al. Table 10 in a byte-level text LM "
                                                                      "(no BOS)"))
        print(f"wrote {figure}")
