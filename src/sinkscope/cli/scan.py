"""`sinkscope scan`: profile attention sinks and extreme tokens of a model on one kind of input."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from sinkscope.cli.common import DEVICE_OPTION, DTYPE_OPTION, REVISION_OPTION, TRUST_OPTION, load_cli_model
from sinkscope.errors import InputError
from sinkscope.inputs import TokenBatch, file_inputs, random_inputs, repeat_inputs, text_inputs
from sinkscope.io import check_output_dir, ensure_output_dir, save_figure_atomic, write_csv_atomic, write_json_atomic
from sinkscope.models.load import DEFAULT_MODEL


def build_inputs(tokenizer, *, text: list[str] | None, file: Path | None, random: int | None, samples: int,
                 repeat: str | None, times: int | None, bos: str, max_tokens: int | None, seed: int) -> TokenBatch:
    """The `TokenBatch` that exactly one of the input options describes."""
    given = [n for n, v in (("--text", text), ("--file", file), ("--random", random), ("--repeat", repeat))
             if v not in (None, [])]
    if len(given) != 1:
        raise InputError("give exactly one input: --text, --file, --random N or --repeat WORD --times N"
                         + (f" (got {', '.join(given)})" if given else ""))
    if samples < 1:
        raise InputError(f"--samples must be a positive integer, got {samples}")
    if text:
        return text_inputs(tokenizer, list(text), bos=bos, max_tokens=max_tokens)
    if file is not None:
        return file_inputs(tokenizer, file, bos=bos, max_tokens=max_tokens, samples=samples)
    if random is not None:
        return random_inputs(tokenizer, random, samples, bos=bos, seed=seed)
    if times is None:
        raise InputError("--repeat WORD needs --times N")
    return repeat_inputs(tokenizer, str(repeat), times, bos=bos)


def command(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m",
                              help="alias, HF directory, .gguf file, hub id, saved patch or `sinkscope train` run"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory"),
    text: Optional[list[str]] = typer.Option(None, "--text", help="input text (repeat for several samples)"),
    file: Optional[Path] = typer.Option(None, "--file", help="a UTF-8 text file"),
    random: Optional[int] = typer.Option(None, "--random", help="N uniformly random tokens per sample"),
    samples: int = typer.Option(1, "--samples", help="samples for --random (or chunks of --file)"),
    repeat: Optional[str] = typer.Option(None, "--repeat", help="a single-token word to repeat"),
    times: Optional[int] = typer.Option(None, "--times", help="how many times to repeat it"),
    bos: str = typer.Option("auto", "--bos", help="auto | always | never: prepend a BOS token?"),
    eps: float = typer.Option(0.3, "--eps", help="sink threshold of Sink_k^eps"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="truncate each sample to this many tokens"),
    batch_size: int = typer.Option(8, "--batch-size"),
    seed: int = typer.Option(0, "--seed"),
    trust_remote_code: bool = TRUST_OPTION,
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    revision: Optional[str] = REVISION_OPTION,
) -> None:
    """Measure sinks (Sink_k^eps, alpha_k per layer/head), value drains, residual peaks, massive activations and
    q-k alignment; writes profile.json, heads.csv and PNG plots to --out."""
    console = Console(stderr=True)
    if times is not None and times < 1:
        raise InputError(f"--times must be a positive integer, got {times}")
    if random is not None and random < 1:
        raise InputError(f"--random must be a positive integer, got {random}")
    if not 0 < eps < 1:
        raise InputError(f"--eps must be in (0, 1), got {eps}")
    check_output_dir(out)
    t0 = time.perf_counter()
    lm, tokenizer = load_cli_model(model, device=device, dtype=dtype, revision=revision,
                                   trust_remote_code=trust_remote_code)
    t_load = time.perf_counter() - t0
    from sinkscope.analyses.qk_alignment import qk_alignment
    from sinkscope.models.adapters import get_adapter, has_adapter
    from sinkscope.profile import profile_sinks
    from sinkscope.versions import versions
    from sinkscope.viz.plots import PLOTS

    batch = build_inputs(tokenizer, text=text, file=file, random=random, samples=samples, repeat=repeat,
                         times=times, bos=bos, max_tokens=max_tokens, seed=seed)
    adapter = get_adapter(lm) if has_adapter(lm) else None  # resolved once for the whole command
    with Progress(TextColumn("[bold]profiling"), BarColumn(), TextColumn("{task.completed}/{task.total} layers"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("profile", total=None)
        prof = profile_sinks(lm, batch, eps=eps, batch_size=batch_size, adapter=adapter,
                             progress=lambda done, total: bar.update(task, completed=done, total=total))
    prof.timing["load_s"] = t_load
    result = prof.to_json()
    first = batch.sequences[0]
    sinks = [p["position"] for p in prof.top_sinks(3) if p["position"] < len(first) - 1]
    if sinks and adapter is not None:  # Gu et al.: sink keys align with all queries (a key bias); first sample
        result["qk_alignment"] = qk_alignment(lm, first, sinks, adapter=adapter).to_json()
    result["versions"] = versions()
    result["bos"] = {"policy": bos, "prepended": batch.bos_prepended}
    out_dir = ensure_output_dir(out)
    write_json_atomic(out_dir / "profile.json", result)
    write_csv_atomic(out_dir / "heads.csv", prof.heads_rows())
    for name, plot in PLOTS.items():
        save_figure_atomic(out_dir / name, plot(prof))
    peak = result["residual_peak"]
    peak_text = (f"residual peak {peak['ratio']:.1f}x median at layer {peak['layer']}" if peak
                 else "no residual peak (no sample has a second token)")
    console.print(
        f"[bold]Sink_0^{eps}[/] = {result['sink_ratio']:.3f} over {len(batch.sequences)} sample(s) of "
        f"{min(batch.lengths)}-{max(batch.lengths)} tokens (BOS prepended: {batch.bos_prepended}); "
        f"top sinks {[s['position'] for s in result['top_sinks'][:3]]}; {peak_text}. "
        f"Wrote {out_dir}/profile.json, heads.csv, "
        f"{len(PLOTS)} plots."
    )
