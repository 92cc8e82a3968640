"""`sinkscope stream`: long-stream perplexity under KV-cache policies (`eval`) and endless sink-cache generation
(`generate`)."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from sinkscope.cli.common import (
    DEVICE_OPTION,
    DTYPE_OPTION,
    MODEL_OPTION,
    REVISION_OPTION,
    THREADS_OPTION,
    TRUST_OPTION,
    ModelOptions,
    PhaseProgress,
    check_threads,
    locked_output,
    output_dir,
    shown_path,
)
from sinkscope.errors import InputError

app = typer.Typer(help="Streaming with attention sinks (StreamingLLM): evaluate cache policies, generate endlessly.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _parse_policies(policies: str | None) -> tuple[str, ...]:
    from sinkscope.comma_lists import split_items
    from sinkscope.streaming.ppl import DEFAULT_POLICIES

    if policies is None:
        return DEFAULT_POLICIES
    return split_items(policies)  # checked by StreamOptions


@app.command("eval")
def eval_command(
    model: str = MODEL_OPTION,
    file: Path | None = typer.Option(
        None, "--file", "-f", help="a UTF-8 text file: the stream (default: the WikiText-2 validation text shipped "
                                   "with sinkscope)"),
    out: str = typer.Option(..., "--out", "-o", help="output directory"),
    sinks: int = typer.Option(4, "--sinks", help="first tokens kept by the sinks policy"),
    window: int = typer.Option(1020, "--window", help="recent tokens kept (window/recompute keep sinks+window)"),
    tokens: int = typer.Option(2048, "--tokens", "-n", help="stream length in tokens"),
    policies: str | None = typer.Option(
        None, "--policies", help="comma list of dense,window,sinks,sinks_plain,recompute "
                                 "(default: dense,window,sinks,recompute)"),
    bos: str = typer.Option("auto", "--bos", help="auto | always | never: prepend a BOS token?"),
    batch_size: int = typer.Option(16, "--batch-size", help="windows per forward for recompute"),
    token_by_token: bool = typer.Option(
        False, "--token-by-token", help="feed one token per forward under every policy (default: dense, window "
                                        "and sinks_plain are scored in exact blocks of --chunk queries)"),
    chunk: int = typer.Option(512, "--chunk", help="queries per forward in the exact block mode"),
    threads: int | None = THREADS_OPTION,
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    revision: str | None = REVISION_OPTION,
    trust_remote_code: bool = TRUST_OPTION,
) -> None:
    """Perplexity over a long text for each cache policy, every token predicted from what the policy keeps; writes
    tokens.csv (policy, position, nll), summary.json and log_ppl.png to --out."""
    from sinkscope.corpora import corpus_path
    from sinkscope.inputs import InputSpec
    from sinkscope.streaming.ppl import StreamOptions

    out_dir = output_dir(out)  # every option, the output first, is checked before the model loads
    opts = StreamOptions(n_sink=sinks, window=window, policies=_parse_policies(policies), batch_size=batch_size,
                         mode="token" if token_by_token else "auto", chunk=chunk)
    opts.check_length(tokens)
    check_threads(threads)
    file = corpus_path() if file is None else file
    spec = InputSpec(file=str(file), bos=bos, max_tokens=tokens)  # missing, a directory, empty or binary: now
    source = ModelOptions(model, device, dtype, revision, trust_remote_code)
    with locked_output(out_dir):
        import torch

        from sinkscope.streaming.ppl import evaluate_stream

        if threads:
            torch.set_num_threads(threads)
        lm, tokenizer, _ = source.load()
        batch = spec.tokens(tokenizer)
        ids = torch.tensor(batch.sequences[0], dtype=torch.long)
        if len(ids) < tokens:
            raise InputError(f"{file} has {len(ids)} tokens, fewer than --tokens {tokens}; use --tokens {len(ids)} "
                             "or a longer file")
        with PhaseProgress(unit="tokens") as progress:
            result = evaluate_stream(lm, ids, **asdict(opts), progress=progress,
                                     meta={"model": model, "file": str(file), "input": batch.to_json(),
                                           "mode": opts.mode, "chunk": chunk, "threads": torch.get_num_threads(),
                                           "argv": sys.argv[1:]})
        written = result.save(out_dir)
    _print_summary(result.to_json(), chunk=chunk, token_by_token=token_by_token)
    print(f"wrote {shown_path(out_dir)}/{', '.join(p.name for p in written)}", file=sys.stderr)


def _print_summary(summary: dict, *, chunk: int, token_by_token: bool) -> None:
    """The policies' table on standard output; how each policy ran, and its notes, on standard error."""
    table = Table(title=f"{summary['tokens']} tokens, {summary['n_sink']} sinks + {summary['window']} window")
    for col in ("policy", "mode", "ppl", "ppl after eviction", "tokens", "tok/s", "peak KV MiB", "RSS delta MiB"):
        table.add_column(col, justify="left" if col in ("policy", "mode") else "right")
    for name, p in summary["policies"].items():
        table.add_row(name, p["mode"], _num(p["ppl"], "{:.2f}"), _num(p["ppl_after_eviction"], "{:.2f}"),
                      str(p["tokens"]), _num(p["tokens_per_s"], "{:.1f}"), f"{p['peak_mem_mb']:.2f}",
                      f"{p['peak_rss_delta_mb']:.1f}")
    Console().print(table)
    console = Console(stderr=True)
    blocks = [n for n, p in summary["policies"].items() if p["mode"] == "fast"]
    others = [f"{n} {p['mode']}" for n, p in summary["policies"].items() if p["mode"] != "fast"]
    console.print("mode: " + "; ".join(
        ([f"{', '.join(blocks)} in exact blocks of {chunk} queries (band mask)"] if blocks else [])
        + ([", ".join(others) + (" (--token-by-token)" if token_by_token else "")] if others else [])))
    for n, p in summary["policies"].items():
        if p.get("note"):
            console.print(f"{n}: {p['note']}")


def _num(x: float, fmt: str) -> str:
    return "n/a" if math.isnan(x) else fmt.format(x)  # NaN: no token in that range


@app.command("generate")
def generate_command(
    prompt: str = typer.Option(..., "--prompt", "-p", help="prompt text"),
    model: str = MODEL_OPTION,
    sinks: int = typer.Option(4, "--sinks", help="first tokens kept (attention sinks)"),
    window: int = typer.Option(1020, "--window", help="recent tokens kept"),
    max_new_tokens: int = typer.Option(0, "--max-new-tokens", "-n", help="stop after N tokens (0: never stop)"),
    temperature: float = typer.Option(0.8, "--temperature", help="0 for greedy decoding"),
    top_k: int | None = typer.Option(50, "--top-k", help="sample among the k most likely tokens"),
    seed: int = typer.Option(0, "--seed"),
    reassign: bool = typer.Option(True, "--reassign/--no-reassign", help="re-assign positions by cache slot"),
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt in the tokenizer's chat template"),
    stop_at_eos: bool = typer.Option(False, "--stop-at-eos", help="stop at the tokenizer's EOS token"),
    prefill_chunk: int = typer.Option(512, "--prefill-chunk", help="prompt tokens per forward"),
    stats: bool = typer.Option(False, "--stats", help="print cache size and speed to stderr at the end"),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    revision: str | None = REVISION_OPTION,
    trust_remote_code: bool = TRUST_OPTION,
) -> None:
    """Generate from a prompt with a sink + window cache at constant memory (endless unless -n is given;
    Ctrl-C stops)."""
    from sinkscope.streaming.generate import GenerateOptions, encode_prompt, stream_generate

    GenerateOptions(sinks, window, max_new_tokens or None, temperature, top_k, prefill_chunk)  # before the load
    lm, tokenizer = ModelOptions(model, device, dtype, revision, trust_remote_code).load()[:2]
    ids = encode_prompt(tokenizer, prompt, chat=chat)
    stop = {tokenizer.eos_token_id} if stop_at_eos and tokenizer.eos_token_id is not None else None
    pending: list[int] = []  # tokens not printed yet (an incomplete UTF-8 character spans several)
    n_tokens, kv = 0, 0
    t0 = time.perf_counter()
    try:
        for tok in stream_generate(lm, ids, n_sink=sinks, window=window, reassign=reassign,
                                   max_new_tokens=max_new_tokens or None, temperature=temperature, top_k=top_k,
                                   seed=seed, prefill_chunk_size=prefill_chunk, stop_ids=stop):
            n_tokens, kv = n_tokens + 1, tok.kv_bytes
            pending.append(tok.token_id)
            text = tokenizer.decode(pending, skip_special_tokens=False)
            if not text.endswith("\ufffd"):
                sys.stdout.write(text)
                sys.stdout.flush()
                pending = []
    finally:
        sys.stdout.write("\n")
        if stats:
            dt = time.perf_counter() - t0
            Console(stderr=True).print(f"{n_tokens} tokens in {dt:.1f} s ({n_tokens / max(dt, 1e-9):.1f} tok/s); "
                                       f"cache {kv / 2**20:.2f} MiB of K/V ({sinks} sinks + {window} window)")

