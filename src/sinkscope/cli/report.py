"""`sinkscope report`: one self-contained HTML page (plus its JSON/CSV) on a model's extreme tokens."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from sinkscope.cli.common import DEVICE_OPTION, DTYPE_OPTION, REVISION_OPTION, TRUST_OPTION, load_cli_model
from sinkscope.errors import InputError
from sinkscope.io import check_output_dir
from sinkscope.models.load import DEFAULT_MODEL, resolve_model_spec


def command(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="alias, HF directory, .gguf file or hub id"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (index.html, report.json, *.csv)"),
    sections: Optional[str] = typer.Option(
        None, "--sections", "-s",
        help="comma-separated sections: model, sinks, drains, dormant, repetition (default: all)"),
    tokens: int = typer.Option(64, "--tokens", help="tokens per input sample"),
    samples: int = typer.Option(8, "--samples", help="samples per input kind (at most 8)"),
    eps: float = typer.Option(0.3, "--eps", help="sink threshold of Sink_k^eps"),
    batch_size: int = typer.Option(8, "--batch-size"),
    repeat_words: Optional[str] = typer.Option(None, "--repeat-words",
                                               help="comma-separated words for the repetition section"),
    repeat_lengths: Optional[str] = typer.Option(None, "--repeat-lengths",
                                                 help="comma-separated repetition lengths (default 32,256,512)"),
    repeat_new_tokens: int = typer.Option(12, "--repeat-new-tokens", help="tokens generated per repetition prompt"),
    circuit_neurons: int = typer.Option(1, "--circuit-neurons",
                                        help="first-token neurons per layer tried for the sink circuit (0: skip)"),
    seed: int = typer.Option(0, "--seed"),
    trust_remote_code: bool = TRUST_OPTION,
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    revision: Optional[str] = REVISION_OPTION,
) -> None:
    """Measure a model's attention sinks, value drains, residual peaks, massive activations, active/dormant heads
    and repeated-token divergence on a built-in mix of inputs; write a self-contained DIR/index.html."""
    console = Console(stderr=True)
    resolve_model_spec(model)  # a bad model name is refused before the heavy imports below
    from sinkscope.report.build import parse_sections

    keys = parse_sections(sections)
    if not 0 < eps < 1:
        raise InputError(f"--eps must be in (0, 1), got {eps}")
    if tokens < 8:
        raise InputError(f"--tokens must be at least 8, got {tokens}")
    if not 1 <= samples <= 8:
        raise InputError(f"--samples must be between 1 and 8, got {samples}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be a positive integer, got {batch_size}")
    extra: dict[str, object] = {}
    if repeat_words is not None:
        extra["repeat_words"] = tuple(w.strip() for w in repeat_words.split(",") if w.strip())
        if not extra["repeat_words"]:
            raise InputError("--repeat-words: give at least one word")
    if repeat_lengths is not None:
        try:
            lengths = sorted({int(x) for x in repeat_lengths.split(",") if x.strip()})
        except ValueError:
            raise InputError(f"bad --repeat-lengths {repeat_lengths!r}: give a comma list of integers") from None
        if not lengths or lengths[0] < 1:
            raise InputError(f"--repeat-lengths must be positive integers, got {repeat_lengths!r}")
        extra["repeat_lengths"] = tuple(lengths)
    if repeat_new_tokens < 1 or circuit_neurons < 0:
        raise InputError("--repeat-new-tokens must be positive and --circuit-neurons non-negative")
    check_output_dir(out)
    t0 = time.perf_counter()
    lm, tokenizer = load_cli_model(model, device=device, dtype=dtype, revision=revision,
                                   trust_remote_code=trust_remote_code)
    load_s = time.perf_counter() - t0
    from sinkscope.report.build import build_report
    from sinkscope.report.sections import SECTIONS, ReportOptions

    opts = ReportOptions(n_tokens=tokens, samples=samples, eps=eps, batch_size=batch_size, seed=seed,
                         repeat_new_tokens=repeat_new_tokens, circuit_per_layer=circuit_neurons,
                         **extra)  # type: ignore[arg-type]
    with Progress(TextColumn("{task.description:<44}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=console) as bar:
        tasks: dict[str, TaskID] = {k: bar.add_task(SECTIONS[k][0], total=None, start=False) for k in keys}

        def progress(key: str, done: int, total: int) -> None:
            task = tasks[key]
            if not bar.tasks[task].started:
                bar.start_task(task)
            bar.update(task, completed=done, total=total)

        result = build_report(lm, tokenizer, out, sections=keys, options=opts, model_spec=model, load_s=load_s,
                              progress=progress)
        for sec in result.sections:  # close every bar, marking failures
            task = tasks[sec.key]
            total = bar.tasks[task].total or 1
            desc = SECTIONS[sec.key][0] + (" [red](failed)[/]" if sec.error else "")
            bar.update(task, completed=total, total=total, description=desc)
    for sec in result.sections:
        if sec.error:
            console.print(f"[red]section {sec.key} failed:[/] {sec.error}")
    console.print(f"Wrote {result.index} ({len(result.sections) - len(result.failed)}/{len(result.sections)} "
                  f"sections ok) in {result.total_s:.0f} s.")
