"""`sinkscope train CONFIG --out DIR [section.key=value ...]`: train a tinygpt and record sink dynamics."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer


def command(
    config: Path = typer.Argument(..., help="Run config YAML (may name a `base:` file)."),
    out: Path = typer.Option(..., "--out", help="Output directory; an existing checkpoint there is resumed."),
    overrides: list[str] | None = typer.Argument(None, help="Dotted overrides, e.g. model.attention=relu optim.lr=1e-3"),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore an existing checkpoint in --out and start over."),
) -> None:
    """Train a small transformer (Bigram-Backcopy or text) and write config.yaml, metrics.jsonl, final.json, plots.

    Rerunning the same command resumes from the last checkpoint (it says from which step); Ctrl-C exits with
    status 130. `train.max_minutes=M` stops cleanly after M minutes (evaluated, checkpointed, final.json written).
    Runs unchanged under `torchrun --nproc_per_node N -m sinkscope.cli train ...` (DDP: gloo on CPU, nccl on GPU).
    """
    from sinkscope.training.config import load_config
    from sinkscope.training.loop import train

    cfg = load_config(config, list(overrides or []))
    # Ctrl-C: the last checkpoint (every train.ckpt_every steps, atomic) is intact; the CLI's entry point says
    # "interrupted; resume with the same command" and exits 130
    result = train(cfg, out, resume=not fresh, progress=sys.stderr.isatty(), argv=["sinkscope", "train", *sys.argv[2:]])
    if result is not None:
        f = result.final
        keys = ("step", "loss", "excess_loss", "sink_ratio", "sink_ratio_proxy", "sink_ratio_slot", "wall_time_s")
        print(json.dumps({k: f[k] for k in keys if k in f}))
        names = [n for n in ("config.yaml", "metrics.jsonl", "final.json", "dynamics.png") if (out / n).is_file()]
        print(f"wrote {out}/: {', '.join(names)}")
