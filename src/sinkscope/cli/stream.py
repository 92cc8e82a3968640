"""`sinkscope stream`: long-stream perplexity under KV-cache policies (`eval`) and endless sink-cache generation
(`generate`)."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sinkscope.cli.common import (
    DEVICE_OPTION, DTYPE_OPTION, MODEL_OPTION, REVISION_OPTION, TRUST_OPTION, load_cli_model,
)
from sinkscope.errors import InputError
from sinkscope.io import ensure_output_dir, read_text_file, save_figure_atomic, write_csv_atomic, write_json_atomic

app = typer.Typer(help="Streaming with attention sinks (StreamingLLM): evaluate cache policies, generate endlessly.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _parse_policies(policies: Optional[str]) -> list[str]:
    from sinkscope.streaming.ppl import ALL_POLICIES, DEFAULT_POLICIES

    if policies is None:
        return list(DEFAULT_POLICIES)
    names = [p.strip() for p in policies.split(",") if p.strip()]
    bad = [p for p in names if p not in ALL_POLICIES]
    if bad or not names:
        raise InputError(f"unknown --policies {','.join(bad) or '(empty)'}; choose from {','.join(ALL_POLICIES)}")
    return names


@app.command("eval")
def eval_command(
    model: str = MODEL_OPTION,
    file: Optional[Path] = typer.Option(
        None, "--file", "-f", help="a UTF-8 text file: the stream (default: the WikiText-2 validation text shipped "
                                   "with sinkscope)"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory"),
    sinks: int = typer.Option(4, "--sinks", help="first tokens kept by the sinks policy"),
    window: int = typer.Option(1020, "--window", help="recent tokens kept (window/recompute keep sinks+window)"),
    tokens: int = typer.Option(2048, "--tokens", "-n", help="stream length in tokens"),
    policies: Optional[str] = typer.Option(
        None, "--policies", help="comma list of dense,window,sinks,sinks_plain,recompute "
                                 "(default: dense,window,sinks,recompute)"),
    bos: str = typer.Option("auto", "--bos", help="auto | always | never: prepend a BOS token?"),
    batch_size: int = typer.Option(16, "--batch-size", help="windows per forward for recompute"),
    token_by_token: bool = typer.Option(
        False, "--token-by-token", help="feed one token per forward under every policy (default: dense, window "
                                        "and sinks_plain are scored in exact blocks of --chunk queries)"),
    chunk: int = typer.Option(512, "--chunk", help="queries per forward in the exact block mode"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads"),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    revision: Optional[str] = REVISION_OPTION,
    trust_remote_code: bool = TRUST_OPTION,
) -> None:
    """Perplexity over a long text for each cache policy, every token predicted from what the policy keeps; writes
    tokens.csv (policy, position, nll), summary.json and log_ppl.png to --out."""
    if tokens < 2:
        raise InputError(f"--tokens must be at least 2, got {tokens}")
    if sinks < 0 or window < 1:
        raise InputError(f"need --sinks >= 0 and --window >= 1, got {sinks} and {window}")
    if tokens <= sinks + window + 1:
        raise InputError(f"--tokens {tokens} <= --sinks + --window + 1 = {sinks + window + 1}: the cache never "
                         "evicts, so the policies cannot differ; give more --tokens or a smaller --window")
    if batch_size < 1 or chunk < 1:
        raise InputError(f"need --batch-size >= 1 and --chunk >= 1, got {batch_size} and {chunk}")
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}")
    names = _parse_policies(policies)
    if file is None:
        from sinkscope.corpora import corpus_path

        file = corpus_path()
    read_text_file(file, "--file")  # missing, empty or binary: one line, before the model loads
    out = ensure_output_dir(out)

    import torch

    from sinkscope.inputs import file_inputs
    from sinkscope.streaming.ppl import evaluate_stream, plot_log_ppl

    if threads:
        torch.set_num_threads(threads)
    console = Console(stderr=True)
    lm, tokenizer = load_cli_model(model, device=device, dtype=dtype, revision=revision,
                                   trust_remote_code=trust_remote_code)
    batch = file_inputs(tokenizer, file, bos=bos, max_tokens=tokens)
    ids = torch.tensor(batch.sequences[0], dtype=torch.long)
    if len(ids) < tokens:
        raise InputError(f"{file} has {len(ids)} tokens, fewer than --tokens {tokens}; use --tokens {len(ids)} "
                         "or a longer file")
    mode = "token" if token_by_token else "auto"
    t0 = time.perf_counter()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        def on_policy(name: str, total: int):
            task = bar.add_task(name, total=total)
            return lambda done: bar.update(task, completed=done)

        result = evaluate_stream(lm, ids, n_sink=sinks, window=window, policies=names, batch_size=batch_size,
                                 mode=mode, chunk=chunk, on_policy=on_policy,
                                 meta={"model": model, "file": str(file), "input": batch.to_json(),
                                       "mode": mode, "chunk": chunk, "threads": torch.get_num_threads(),
                                       "argv": sys.argv[1:]})
    summary = result.to_json()
    summary["total_seconds"] = time.perf_counter() - t0
    write_csv_atomic(out / "tokens.csv", result.to_rows())
    write_json_atomic(out / "summary.json", summary)
    save_figure_atomic(out / "log_ppl.png", plot_log_ppl(result))

    table = Table(title=f"{len(ids)} tokens, {sinks} sinks + {window} window")
    for col in ("policy", "mode", "ppl", "ppl after eviction", "tokens", "tok/s", "peak KV MiB", "RSS delta MiB"):
        table.add_column(col, justify="left" if col in ("policy", "mode") else "right")
    for name, p in summary["policies"].items():
        table.add_row(name, p["mode"], _num(p["ppl"], "{:.2f}"), _num(p["ppl_after_eviction"], "{:.2f}"),
                      str(p["tokens"]), _num(p["tokens_per_s"], "{:.1f}"), f"{p['peak_mem_mb']:.2f}",
                      f"{p['peak_rss_delta_mb']:.1f}")
    Console().print(table)
    blocks = [n for n, p in summary["policies"].items() if p["mode"] == "fast"]
    others = [f"{n} {p['mode']}" for n, p in summary["policies"].items() if p["mode"] != "fast"]
    console.print("mode: " + "; ".join(
        ([f"{', '.join(blocks)} in exact blocks of {chunk} queries (band mask)"] if blocks else [])
        + ([", ".join(others) + (" (--token-by-token)" if token_by_token else "")] if others else [])))
    for n, p in summary["policies"].items():
        if p.get("note"):
            console.print(f"{n}: {p['note']}")
    console.print(f"wrote {out}/tokens.csv, summary.json, log_ppl.png")


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
    top_k: Optional[int] = typer.Option(50, "--top-k", help="sample among the k most likely tokens"),
    seed: int = typer.Option(0, "--seed"),
    reassign: bool = typer.Option(True, "--reassign/--no-reassign", help="re-assign positions by cache slot"),
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt in the tokenizer's chat template"),
    stop_at_eos: bool = typer.Option(False, "--stop-at-eos", help="stop at the tokenizer's EOS token"),
    prefill_chunk: int = typer.Option(512, "--prefill-chunk", help="prompt tokens per forward"),
    stats: bool = typer.Option(False, "--stats", help="print cache size and speed to stderr at the end"),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    revision: Optional[str] = REVISION_OPTION,
    trust_remote_code: bool = TRUST_OPTION,
) -> None:
    """Generate from a prompt with a sink + window cache at constant memory (endless unless -n is given;
    Ctrl-C stops)."""
    from sinkscope.streaming.generate import stream_generate

    if sinks < 0 or window < 1:
        raise InputError(f"need --sinks >= 0 and --window >= 1, got {sinks} and {window}")
    if max_new_tokens < 0:
        raise InputError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise InputError(f"--temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise InputError(f"--top-k must be >= 1, got {top_k}")
    if prefill_chunk < 1:
        raise InputError(f"--prefill-chunk must be >= 1, got {prefill_chunk}")
    lm, tokenizer = load_cli_model(model, device=device, dtype=dtype, revision=revision,
                                   trust_remote_code=trust_remote_code)
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    else:
        ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not ids:
        raise InputError("the prompt has no tokens")
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

