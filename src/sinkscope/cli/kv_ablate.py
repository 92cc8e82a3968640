"""`sinkscope kv ablate`: toggle each kv head of a policy on DEV probes and compare with the calibration's ranking.

Registered in the ``kv`` command group (``cli/kv.py``) as ``app.command("ablate")(ablate_command)``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from sinkscope.cli.common import (
    DEVICE_OPTION,
    DTYPE_OPTION,
    REVISION_OPTION,
    THREADS_OPTION,
    TRUST_OPTION,
    ModelOptions,
    check_threads,
    locked_output,
    output_dir,
)
from sinkscope.comma_lists import parse_floats, parse_names
from sinkscope.errors import InputError


def ablate_command(
    policy: Path = typer.Option(..., "--policy", "-p", help="the calibrated policy to toggle heads of"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (resumable: ablation_rows.jsonl)"),
    base: str = typer.Option("policy", "--base", help="'policy': toggle each head at the policy (what keeping "
                                                      "it full gains there); 'dense': stream each head alone"),
    depths: str = typer.Option("0.25,0.75", "--depths", help="needle depths of the DEV retrieval probes"),
    tasks: str = typer.Option("passkey,multikey,prose,code", "--tasks", help="DEV probe kinds"),
    kl_tokens: int = typer.Option(256, "--kl-tokens", help="scored tail of the DEV streams (tokens)"),
    gain: str = typer.Option("gain_logp", "--gain", help="the measured gain that ranks the heads of the policy "
                                                          "written to OUT/policy: gain_logp (retrieval answer "
                                                          "log-prob) or gain_kl (stream KL)"),
    model: str | None = typer.Option(None, "--model", "-m", help="default: the policy's model"),
    threads: int | None = THREADS_OPTION,
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    revision: str | None = REVISION_OPTION,
    trust_remote_code: bool = TRUST_OPTION,
) -> None:
    """Per kv head, what keeping it full instead of sinks + window changes on DEV probes (pass-key answer
    log-prob, stream KL), against the calibration's ranking; writes ablation.json, ablation_heads.csv and
    OUT/policy (the policy's budget and window, heads ranked by the measured --gain)."""
    from sinkscope.kv.ablate import GAINS, AblationOptions, ablate, all_full
    from sinkscope.kv.policy import KVPolicy

    if base not in ("policy", "dense"):
        raise InputError(f"--base must be 'policy' or 'dense', got {base!r}", param="base")
    if gain not in GAINS:
        raise InputError(f"--gain must be one of {', '.join(GAINS)}, got {gain!r}", param="gain")
    check_threads(threads)
    pol = KVPolicy.load(policy)
    if pol.scores_array() is None:
        raise InputError(f"{policy} has no head scores to compare with (calibrate it with sinkscope kv calibrate)",
                         param="policy")
    options = AblationOptions(length=pol.target_length, depths=parse_floats(depths, flag="depths"),
                              tasks=parse_names(tasks, flag="tasks", known=["passkey", "multikey", "prose", "code"]),
                              kl_tokens=kl_tokens)
    out = output_dir(str(out))
    from sinkscope.models.load import DEFAULT_MODEL

    spec = model or (pol.model.get("source") or {}).get("spec") or DEFAULT_MODEL
    model_opts = ModelOptions(spec, device, dtype, revision, trust_remote_code)
    import torch

    from sinkscope.progress import ProgressReporter

    if threads:
        torch.set_num_threads(threads)
    with locked_output(out):
        lm, tokenizer, _ = model_opts.load()
        pol.check_model(lm)
        start = pol if base == "policy" else all_full(pol)
        with ProgressReporter("kv ablate runs", unit="runs") as report:
            result = ablate(lm, tokenizer, start, options, out=out, progress=report)
        result.info["argv"] = sys.argv[1:]
        result.save(out)
        if base == "policy":
            result.ranked_policy(gain).save(out / "policy")
    comp = result.comparison()
    probes = result.base_scores()
    print(json.dumps({"probes": probes, "spearman": comp["spearman"], "top_heads_kept": comp["top_heads_kept"]},
                     indent=1))
    print(f"wrote {out}/ablation.json, ablation_heads.csv" + (", policy/" if base == "policy" else ""),
          file=sys.stderr)
