"""`sinkscope kv eval`: KV-cache methods side by side at equal bytes on the shipped long-context suite.

Registered in the ``kv`` command group (``cli/kv.py``) as ``app.command("eval")(eval_command)``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from sinkscope.cli.common import (
    DEVICE_OPTION,
    DTYPE_OPTION,
    MODEL_OPTION,
    REVISION_OPTION,
    THREADS_OPTION,
    TRUST_OPTION,
    ModelOptions,
    check_threads,
    locked_output,
    output_dir,
)
from sinkscope.comma_lists import parse_floats, parse_ints, parse_names
from sinkscope.errors import InputError


def eval_command(
    policy: Path | None = typer.Option(None, "--policy", "-p", help="a calibrated policy directory (sinkscope "
                                          "kv calibrate); needed by the policy and random methods"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (resumable: cells.jsonl is appended)"),
    model: str = MODEL_OPTION,
    budgets: str = typer.Option("0.125,0.25,0.5", "--budgets", help="fractions of the dense cache's bytes"),
    lengths: str = typer.Option("1024", "--lengths", help="prompt / stream lengths in tokens"),
    depths: str = typer.Option("0.1,0.3,0.5,0.7,0.9", "--depths", help="needle depths of the retrieval prompts"),
    methods: str = typer.Option("dense,uniform,policy,random", "--methods", help="comma list of methods"),
    tasks: str = typer.Option("passkey,multikey,prose,code,agree", "--tasks", help="comma list of suite tasks"),
    seeds: str = typer.Option("0,1,2", "--seeds", help="seeds of the random-head control"),
    n_sink: int | None = typer.Option(None, "--sinks", help="sinks of the uniform method (default: the "
                                         "policy's, else 4)"),
    streams: int = typer.Option(1, "--streams", help="prose and code streams per length"),
    score_tokens: int = typer.Option(64, "--score-tokens", help="scored tail of every stream (tokens)"),
    agree: int = typer.Option(2, "--agree", help="greedy-agreement prompts per length"),
    chunk: int = typer.Option(256, "--chunk", help="prefill tokens per forward"),
    threads: int | None = THREADS_OPTION,
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    revision: str | None = REVISION_OPTION,
    trust_remote_code: bool = TRUST_OPTION,
) -> None:
    """Dense, uniform sinks + window, the calibrated policy and random full-cache heads at equal KV bytes on
    passkey, multi-key, prose/code streams and greedy agreement; writes cells.jsonl, summary.json/.csv/.md and
    kv_quality.png to --out."""
    from sinkscope.kv.evaluate import METHODS, EvalOptions, MethodContext, build_methods, evaluate, threads_note
    from sinkscope.kv.suite import TASKS, SuiteSpec

    spec = SuiteSpec(lengths=parse_ints(lengths, flag="lengths"), depths=parse_floats(depths, flag="depths"),
                     tasks=parse_names(tasks, flag="tasks", known=list(TASKS)), n_streams=streams, n_agree=agree,
                     score_tokens=score_tokens)
    names = parse_names(methods, flag="methods", known=METHODS.names())
    budget_vals = parse_floats(budgets, flag="budgets")
    if any(not 0 < b < 1 for b in budget_vals):
        raise InputError(f"--budgets must lie in (0, 1), got {budgets}", param="budgets")
    seed_vals = parse_ints(seeds, flag="seeds")
    options = EvalOptions(chunk=chunk)
    check_threads(threads)
    if streams < 0 or agree < 0:
        raise InputError("--streams and --agree must be >= 0")
    kv_policy: Any = None
    if policy is not None:
        from sinkscope.kv.policy import KVPolicy

        kv_policy = KVPolicy.load(policy)
    elif {"policy", "random"} & set(names):
        raise InputError("--methods policy/random need --policy DIR (a calibrated policy)", param="policy")
    model_opts = ModelOptions(model, device, dtype, revision, trust_remote_code)
    out = output_dir(str(out))

    import torch

    from sinkscope.kv.suite import build_suite
    from sinkscope.progress import ProgressReporter
    from sinkscope.viz.kv import plot_quality_vs_bytes

    if threads:
        torch.set_num_threads(threads)
    with locked_output(out):
        lm, tokenizer, _ = model_opts.load()
        sinks = n_sink if n_sink is not None else (kv_policy.n_sink if kv_policy is not None else 4)
        ctx = MethodContext(policy=kv_policy, budgets=budget_vals, seeds=seed_vals, n_sink=sinks)
        method_list = build_methods(lm, names, ctx)
        suite = build_suite(tokenizer, spec)
        # what every cell depends on (hashed into its key); methods, budgets and seeds are in the key itself, so
        # adding one to a finished run measures only the new cells
        settings = {"model": model, "dtype": dtype, "device": device, "n_sink_uniform": sinks,
                    "policy": None if kv_policy is None else kv_policy.to_json()}
        with ProgressReporter("kv eval cells", unit="cells") as report:
            result = evaluate(lm, tokenizer, suite, method_list, out, options, settings=settings, progress=report)
        result.settings["run"] = {"argv": sys.argv[1:], "methods": list(names), "budgets": list(budget_vals),
                                  "seeds": list(seed_vals), **threads_note()}
        result.save(out, plot=plot_quality_vs_bytes)
    from sinkscope.kv.evaluate import summary_markdown

    print(summary_markdown(result.summary()))
    print(f"wrote {out}/cells.jsonl, summary.json, summary.csv, summary.md, kv_quality.png", file=sys.stderr)
