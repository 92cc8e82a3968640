"""`sinkscope kv`: calibrate a per-head KV-cache policy (`calibrate`) and generate with it (`generate`)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import typer

from sinkscope.cli.common import (
    DEVICE_OPTION,
    DTYPE_OPTION,
    MODEL_OPTION,
    REVISION_OPTION,
    TRUST_OPTION,
    ModelOptions,
    locked_output,
)
from sinkscope.errors import InputError

app = typer.Typer(help="Per-head KV-cache compression calibrated from the sink profile: calibrate, generate, "
                       "eval, ablate.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@dataclass(frozen=True)
class CalibrateOptions:
    """`kv calibrate`'s options, checked before anything loads."""

    out: Path
    budget: float | None
    max_kl: float | None
    file: Path | None
    length: int
    sinks: int
    window: int | None

    def __post_init__(self) -> None:
        if self.window is None:
            from sinkscope.kv.calibrate import default_window

            object.__setattr__(self, "window", default_window(self.budget, self.sinks, self.length))
        if self.budget is not None and self.max_kl is not None:
            raise InputError("give --budget or --max-kl, not both")
        if self.budget is not None and not 0 < self.budget <= 1:
            raise InputError(f"--budget is a fraction of the dense cache's bytes in (0, 1], got {self.budget}")
        if self.max_kl is not None and not self.max_kl > 0:
            raise InputError(f"--max-kl must be positive (nats/token), got {self.max_kl}")
        if self.sinks < 0 or self.window < 1:
            raise InputError(f"need --sinks >= 0 and --window >= 1, got {self.sinks} and {self.window}")
        if self.length <= self.sinks + self.window + 1:
            raise InputError(f"--length {self.length} must exceed --sinks + --window + 1 = "
                             f"{self.sinks + self.window + 1}")
        if self.budget is not None:
            from sinkscope.kv.policy import n_full_for_budget

            n_full_for_budget(self.budget, 1, self.sinks, self.window, self.length)  # the floor, in one line
        if self.file is not None:
            from sinkscope.io import read_text_file

            read_text_file(self.file, "--file")
        from sinkscope.io import check_output_dir

        check_output_dir(self.out)


@app.command("calibrate")
def calibrate_command(
    out: Path = typer.Option(..., "--out", "-o", help="output directory (policy.json, DuoAttention pattern)"),
    model: str = MODEL_OPTION,
    budget: float | None = typer.Option(None, "--budget", help="fraction of the dense cache's bytes at --length "
                                                                  "(default 0.25 unless --max-kl)"),
    max_kl: float | None = typer.Option(None, "--max-kl", help="instead of --budget: the smallest budget whose "
                                                                  "held-out next-token KL (nats/token) stays below"),
    file: Path | None = typer.Option(None, "--file", "-f", help="your own calibration text (default: the shipped "
                                                                   "DEV mix of prose, code and retrieval prompts)"),
    length: int = typer.Option(1024, "--length", help="target length in tokens (the budget refers to it)"),
    sinks: int = typer.Option(4, "--sinks", help="first tokens every streaming head keeps"),
    window: int | None = typer.Option(None, "--window", help="recent tokens every streaming head keeps (default: "
                                                                "half the budget's bytes, budget/2 * length - sinks)"),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    revision: str | None = REVISION_OPTION,
    trust_remote_code: bool = TRUST_OPTION,
) -> None:
    """Rank every kv head by the attention it sends beyond sinks + window, keep the top ones in full; writes
    policy.json, full_attention_heads.tsv + config.json (DuoAttention's format) and calibration.json to --out."""
    opts = CalibrateOptions(out, budget, max_kl, file, length, sinks, window)
    model_opts = ModelOptions(model, device, dtype, revision, trust_remote_code)
    from sinkscope.io import read_text_file
    from sinkscope.kv.calibrate import calibrate
    from sinkscope.progress import ProgressReporter

    texts = [read_text_file(opts.file, "--file")] if opts.file is not None else None  # bad input before any work
    with locked_output(Path(opts.out)):
        lm, tokenizer, _ = model_opts.load()
        with ProgressReporter("calibrating", unit="steps") as progress:
            result = calibrate(lm, tokenizer, texts=texts, target_length=opts.length, n_sink=opts.sinks,
                               window=opts.window, budget=opts.budget, max_kl=opts.max_kl, progress=progress)
        result.policy.info["argv"] = sys.argv[1:]
        result.save(opts.out)
    p = result.policy
    kl = "not measured" if p.measured_kl is None else f"{p.measured_kl:.4f} nats/token"
    print(f"{p.n_full} of {p.n_heads_total} kv heads keep the full cache; {p.n_sink} sinks + {p.window} window for "
          f"the rest; {p.budget:.1%} of the dense cache's bytes at {p.target_length} tokens; held-out KL {kl}; "
          f"{result.seconds:.0f} s; wrote {opts.out}")


@app.command("generate")
def generate_command(
    policy: Path = typer.Option(..., "--policy", "-p", help="a policy directory written by kv calibrate"),
    prompt: str | None = typer.Option(None, "--prompt", help="the prompt text"),
    prompt_file: Path | None = typer.Option(None, "--prompt-file", help="read the prompt from this file"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="tokens to generate"),
    model: str | None = typer.Option(None, "--model", "-m", help="default: the policy's model"),
    json_out: bool = typer.Option(False, "--json", help="print the result as JSON"),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    revision: str | None = REVISION_OPTION,
    trust_remote_code: bool = TRUST_OPTION,
) -> None:
    """Greedy generation with the head-wise cache of --policy (full heads keep everything, the others sinks +
    window); prints the continuation and the cache's bytes against a dense cache's."""
    if (prompt is None) == (prompt_file is None):
        raise InputError("give exactly one of --prompt and --prompt-file")
    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    from sinkscope.io import read_text_file
    from sinkscope.kv.policy import KVPolicy

    pol = KVPolicy.load(policy)
    text = prompt if prompt is not None else read_text_file(prompt_file, "--prompt-file")
    if not text.strip():
        raise InputError("--prompt is empty")
    from sinkscope.models.load import DEFAULT_MODEL

    spec = model or (pol.model.get("source") or {}).get("spec") or DEFAULT_MODEL
    lm, tokenizer, _ = ModelOptions(spec, device, dtype, revision, trust_remote_code).load()
    from sinkscope.kv.generate import generate_with_policy

    pol.check_model(lm)
    result = generate_with_policy(lm, tokenizer, pol, text, max_new_tokens=max_new_tokens)
    if json_out:
        print(json.dumps(result.to_json()))
        return
    print(result.text)
    print(f"KV cache: {result.stored_bytes / 2**20:.2f} MiB stored, dense {result.dense_bytes / 2**20:.2f} MiB "
          f"({result.stored_bytes / max(1, result.dense_bytes):.1%}) after {result.prompt_tokens} + "
          f"{len(result.new_ids)} tokens", file=sys.stderr)


from sinkscope.cli.kv_eval import eval_command  # noqa: E402 - the eval command lives in its own module

app.command("eval")(eval_command)

from sinkscope.cli.kv_ablate import ablate_command  # noqa: E402 - the ablation command lives in its own module

app.command("ablate")(ablate_command)
