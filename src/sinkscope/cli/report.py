"""`sinkscope report`: one self-contained HTML page (plus its JSON/CSV) on a model's extreme tokens."""

from __future__ import annotations

import typer

from sinkscope.cli.common import (
    DEVICE_OPTION,
    DTYPE_OPTION,
    REVISION_OPTION,
    TRUST_OPTION,
    ModelOptions,
    PhaseProgress,
    locked_output,
    output_dir,
    shown_path,
)
from sinkscope.comma_lists import parse_ints, parse_names
from sinkscope.models.load import DEFAULT_MODEL


def _words(value: str | None) -> dict[str, tuple[str, ...]]:
    if value is None:
        return {}
    return {"repeat_words": parse_names(value, flag="repeat-words", empty="give at least one word")}


def _lengths(value: str | None) -> dict[str, tuple[int, ...]]:
    if value is None:
        return {}
    lengths = parse_ints(value, flag="repeat-lengths", unique_sorted=True)
    return {"repeat_lengths": lengths}  # non-positive: refused by ReportOptions


def command(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="alias, HF directory, .gguf file or hub id"),
    out: str = typer.Option(..., "--out", "-o", help="output directory (index.html, report.json, *.csv)"),
    sections: str | None = typer.Option(
        None, "--sections", "-s",
        help="comma-separated sections: model, sinks, drains, dormant, kv, repetition (default: all)"),
    tokens: int = typer.Option(64, "--tokens", help="tokens per input sample"),
    samples: int = typer.Option(8, "--samples", help="samples per input kind (at most 8)"),
    eps: float = typer.Option(0.3, "--eps", help="sink threshold of Sink_k^eps"),
    batch_size: int = typer.Option(8, "--batch-size"),
    repeat_words: str | None = typer.Option(None, "--repeat-words",
                                               help="comma-separated words for the repetition section"),
    repeat_lengths: str | None = typer.Option(None, "--repeat-lengths",
                                                 help="comma-separated repetition lengths (default 32,256,512)"),
    repeat_new_tokens: int = typer.Option(12, "--repeat-new-tokens", help="tokens generated per repetition prompt"),
    circuit_neurons: int = typer.Option(1, "--circuit-neurons",
                                        help="first-token neurons per layer tried for the sink circuit (0: skip)"),
    seed: int = typer.Option(0, "--seed"),
    trust_remote_code: bool = TRUST_OPTION,
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    revision: str | None = REVISION_OPTION,
) -> int:
    """Measure a model's attention sinks, value drains, residual peaks, massive activations, active/dormant heads
    and repeated-token divergence on a built-in mix of inputs; write a self-contained DIR/index.html. Exits 1
    when a section failed (the page shows why)."""
    from sinkscope.report.build import build_report, parse_sections
    from sinkscope.report.sections import ReportOptions

    out_dir = output_dir(out)  # every option, the output first, is checked before the model loads
    source = ModelOptions(model, device, dtype, revision, trust_remote_code)
    keys = parse_sections(sections)
    opts = ReportOptions(n_tokens=tokens, samples=samples, eps=eps, batch_size=batch_size, seed=seed,
                         repeat_new_tokens=repeat_new_tokens, circuit_per_layer=circuit_neurons,
                         **_words(repeat_words), **_lengths(repeat_lengths))  # type: ignore[arg-type]
    with locked_output(out_dir):
        lm, tokenizer, load_s = source.load()
        with PhaseProgress() as progress:
            result = build_report(lm, tokenizer, out_dir, sections=keys, options=opts, model_spec=model,
                                  load_s=load_s, progress=progress)
    for sec in result.sections:
        if sec.error:
            print(f"section {sec.key} failed: {sec.error}")
    ok = len(result.sections) - len(result.failed)
    print(f"Wrote {shown_path(result.index)} ({ok}/{len(result.sections)} sections ok) in {result.total_s:.0f} s.")
    return 1 if result.failed else 0
