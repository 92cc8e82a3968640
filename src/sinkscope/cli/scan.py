"""`sinkscope scan`: profile attention sinks and extreme tokens of a model on one kind of input."""

from __future__ import annotations

from pathlib import Path

import typer

from sinkscope.cli.common import (
    DEVICE_OPTION,
    DTYPE_OPTION,
    REVISION_OPTION,
    TRUST_OPTION,
    ModelOptions,
    locked_output,
    output_dir,
    shown_path,
)
from sinkscope.inputs import InputSpec
from sinkscope.models.load import DEFAULT_MODEL
from sinkscope.progress import ProgressReporter


def command(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m",
                              help="alias, HF directory, .gguf file, hub id, saved patch or `sinkscope train` run"),
    out: str = typer.Option(..., "--out", "-o", help="output directory"),
    text: list[str] | None = typer.Option(None, "--text", help="input text (repeat for several samples)"),
    file: Path | None = typer.Option(None, "--file", help="a UTF-8 text file"),
    random: int | None = typer.Option(None, "--random", help="N uniformly random tokens per sample"),
    samples: int = typer.Option(1, "--samples", help="samples for --random (or chunks of --file)"),
    repeat: str | None = typer.Option(None, "--repeat", help="a single-token word to repeat"),
    times: int | None = typer.Option(None, "--times", help="how many times to repeat it"),
    bos: str = typer.Option("auto", "--bos", help="auto | always | never: prepend a BOS token?"),
    eps: float = typer.Option(0.3, "--eps", help="sink threshold of Sink_k^eps"),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="truncate each sample to this many tokens"),
    batch_size: int = typer.Option(8, "--batch-size"),
    seed: int = typer.Option(0, "--seed"),
    trust_remote_code: bool = TRUST_OPTION,
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    revision: str | None = REVISION_OPTION,
) -> None:
    """Measure sinks (Sink_k^eps, alpha_k per layer/head), value drains, residual peaks, massive activations and
    q-k alignment; writes profile.json, heads.csv and PNG plots to --out."""
    from sinkscope.profile import ProfileOptions

    out_dir = output_dir(out)  # every option, the output first, is checked before the model loads
    spec = InputSpec(text=tuple(text or ()), file=None if file is None else str(file), random=random,
                     repeat=repeat, times=times, samples=samples, bos=bos, max_tokens=max_tokens, seed=seed)
    opts = ProfileOptions(eps=eps, batch_size=batch_size)
    source = ModelOptions(model, device, dtype, revision, trust_remote_code)
    with locked_output(out_dir):
        lm, tokenizer, load_s = source.load()
        from sinkscope.analyses.qk_alignment import attach_qk_alignment
        from sinkscope.models.adapters import get_adapter, has_adapter
        from sinkscope.profile import profile_sinks

        batch = spec.tokens(tokenizer)
        adapter = get_adapter(lm) if has_adapter(lm) else None  # resolved once for the whole command
        with ProgressReporter("profiling", unit="layers") as progress:
            prof = profile_sinks(lm, batch, eps=opts.eps, batch_size=opts.batch_size, adapter=adapter,
                                 progress=progress)
        prof.timing["load_s"] = load_s
        attach_qk_alignment(prof, lm, batch.sequences[0], adapter=adapter)
        written = prof.save(out_dir)
    peak = prof.summary()["residual_peak"]
    peak_text = (f"residual peak {peak['ratio']:.1f}x median at layer {peak['layer']}" if peak
                 else "no residual peak (no sample has a second token)")
    print(f"Sink_0^{opts.eps} = {prof.sink_ratio(0):.3f} over {len(batch.sequences)} sample(s) of "
          f"{min(batch.lengths)}-{max(batch.lengths)} tokens (BOS prepended: {batch.bos_prepended}); "
          f"top sinks {[s['position'] for s in prof.top_sinks(3)]}; {peak_text}. "
          f"Wrote {shown_path(out_dir)}/{', '.join(p.name for p in written[:2])}, {len(written) - 2} plots.")
