"""The training loop: ``train(cfg, out) -> RunResult``, resumable, deterministic on CPU, DDP-ready.

Output directory: ``config.yaml`` (resolved config + argv), ``task.json`` (what the task was built from, e.g.
the held-out files of a text corpus), ``metrics.jsonl`` (one row per evaluation step, see
:mod:`sinkscope.training.metrics`), ``checkpoint.pt`` (every ``train.ckpt_every`` steps, atomic),
``final.json`` (the last row plus wall time and throughput) and ``dynamics.png``.

A non-finite training loss stops the run with :class:`DivergedError` (nothing non-finite is written, the last
checkpoint is kept); ``train.max_minutes`` ends a run early at a clean step (evaluated, checkpointed, resumable).

Batches are a pure function of (seed, step) and the model has no dropout, so a run killed and resumed from
its checkpoint logs exactly the losses of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sinkscope.errors import InputError, SinkscopeError
from sinkscope.io import finite_json  # NaN/inf -> None, so what is written stays strict JSON
from sinkscope.models.tinygpt import TinyGPT
from sinkscope.tasks.batch import LMBatch
from sinkscope.io import save_figure_atomic, write_atomic
from sinkscope.training.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from sinkscope.training.config import ConfigError, DataConfig, RunConfig
from sinkscope.training.ddp import DistContext, all_reduce_sum, barrier, init_distributed, shutdown
from sinkscope.training.metrics import measure_model


class DivergedError(SinkscopeError):
    """The training loss became NaN or infinite (usually a learning rate far too large)."""


@dataclass
class RunResult:
    """What a finished run produced: its directory, all metric rows, the final row and wall time (s)."""

    out: Path
    rows: list[dict[str, Any]]
    final: dict[str, Any]
    wall_s: float

    def to_json(self) -> dict[str, Any]:
        return {"out": str(self.out), "final": self.final, "wall_s": self.wall_s}


def build_task(data: DataConfig):
    """The task object of ``data.task`` (BigramBackcopy or TextLM); raises InputError for a missing file."""
    if data.task == "bigram_backcopy":
        from sinkscope.tasks.bigram_backcopy import BigramBackcopy
        from sinkscope.corpora import corpus_path

        corpus = data.corpus if data.corpus is not None else corpus_path()
        return BigramBackcopy.from_file(corpus, data.n_chars, data.n_triggers, bos=data.bos)
    from sinkscope.tasks.text_lm import TextLM

    return TextLM.from_file(data.corpus, data.tokenizer, bos=data.bos, eval_split=data.eval_split,
                            fixed_token_pos=data.fixed_token_pos, fixed_token_id=data.fixed_token_id,
                            random_token_pos=data.random_token_pos, prefix_len=data.prefix_len)


def resolve_config(cfg: RunConfig, task: Any) -> RunConfig:
    """Fill in what the task decides (the vocabulary size) and check the model fits the data."""
    if cfg.model.block_size < cfg.data.seq_len:
        raise ConfigError(f"model.block_size={cfg.model.block_size} is smaller than data.seq_len={cfg.data.seq_len}")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=task.vocab_size))


def make_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW or SGD with momentum; weight decay on matrices only (not norms, biases, bias slots)."""
    o = cfg.optim
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "bias" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "bias" not in n)]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then constant or cosine decay to ``min_lr_ratio * lr``."""
    o, total = cfg.optim, cfg.train.steps
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    progress = (step - o.warmup_steps) / max(total - o.warmup_steps, 1)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def evaluation_batch(task: Any, cfg: RunConfig) -> LMBatch:
    """The fixed evaluation batch of a run: held-out rows of ``task`` seeded by ``train.seed``."""
    d = cfg.data
    if hasattr(task, "eval_batch"):
        return task.eval_batch(cfg.train.seed, d.eval_batch_size, d.seq_len)
    return task.batch(cfg.train.seed, 0, d.eval_batch_size, d.seq_len, stream=1)




def check_output_dir(out: Path) -> None:
    """Create ``out`` (and parents) or raise a one-line :class:`InputError` before any work is done: ``out`` is
    an existing file, cannot be created, or is not writable."""
    if out.exists() and not out.is_dir():
        raise InputError(f"output directory {out} is an existing file; give a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create output directory {out}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise InputError(f"output directory {out} is not writable")


def _log(ctx: DistContext, message: str) -> None:
    if ctx.is_main:
        print(message, file=sys.stderr, flush=True)


def _read_rows(path: Path, upto: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto]


def train(cfg: RunConfig, out: str | Path, *, resume: bool = True, progress: bool = True,
          stop_after: int | None = None, argv: list[str] | None = None) -> RunResult | None:
    """Train a tinygpt on ``cfg.data.task`` and write the run directory ``out``.

    Args:
        cfg: the run config.
        out: output directory (created). An existing checkpoint there is resumed when ``resume``.
        progress: show a rich progress bar (rank 0).
        stop_after: stop right after this step as if killed (no final outputs; for resume tests).
        argv: the command line to record in ``config.yaml``.
    Returns:
        The :class:`RunResult` on rank 0 when the run finished (or stopped at ``train.max_minutes``), else None.
    Raises:
        ConfigError / InputError / CheckpointError: one-line user errors (``out`` is checked first).
        DivergedError: the training loss became non-finite.
    """
    t_start = time.perf_counter()
    check_output_dir(Path(out))
    ctx: DistContext = init_distributed(cfg.train.device)
    try:
        return _train(cfg, Path(out), ctx, resume, progress, stop_after, argv, t_start)
    finally:
        shutdown(ctx)


def _train(cfg: RunConfig, out: Path, ctx: DistContext, resume: bool, progress: bool, stop_after: int | None,
           argv: list[str] | None, t_start: float) -> RunResult | None:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on GPUs (CPU runs stay exact fp32)
        torch.backends.cudnn.allow_tf32 = True
    task = build_task(cfg.data)
    cfg = resolve_config(cfg, task)
    tc, d = cfg.train, cfg.data
    if d.batch_size % ctx.world_size:
        raise ConfigError(f"data.batch_size={d.batch_size} is not divisible by the {ctx.world_size} processes")
    metrics_path, ckpt_path = out / "metrics.jsonl", out / CHECKPOINT_NAME

    torch.manual_seed(tc.seed)
    model = TinyGPT(cfg.model).to(ctx.device)
    optimizer = make_optimizer(model, cfg)
    start, window = 0, [0.0, 0.0]  # window: summed train NLL and token count since the last evaluation
    prior_s = 0.0  # wall time of earlier sessions of this run (resume)
    rows: list[dict[str, Any]] = []
    if resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path, cfg.state_dict_fingerprint())
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, window = int(state["step"]), list(state["window"])
        prior_s = float(state.get("elapsed_s", 0.0))
        torch.set_rng_state(state["rng"])
        rows = _read_rows(metrics_path, start)
        _log(ctx, f"resuming {out} from step {start} of {tc.steps} ({ckpt_path.name})")
    barrier(ctx)
    if ctx.is_main:
        header = f"# argv: {json.dumps(argv if argv is not None else sys.argv)}\n"
        write_atomic(out / "config.yaml", header + cfg.to_yaml())
        write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
        if hasattr(task, "describe"):
            write_atomic(out / "task.json", json.dumps(task.describe(), indent=1))
    net: nn.Module = model
    if ctx.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    eval_batch = evaluation_batch(task, cfg).to(ctx.device)
    local_b = d.batch_size // ctx.world_size
    lo, hi = ctx.rank * local_b, (ctx.rank + 1) * local_b

    def evaluate(step: int) -> None:
        s, n = all_reduce_sum(window, ctx)
        if ctx.is_main:
            row = {"step": step, "lr": lr_at(max(step - 1, 0), cfg), "train_loss": s / n if n else None,
                   "tokens": step * d.batch_size * d.seq_len}
            row.update(measure_model(model, eval_batch, eps=tc.eps, dormant_threshold=tc.dormant_threshold))
            if not math.isfinite(row["loss"]):
                raise DivergedError(f"training diverged: the evaluation loss is {row['loss']} at step {step} "
                                    f"(optim.lr={cfg.optim.lr:g}); lower optim.lr")
            row["wall_s"] = round(prior_s + time.perf_counter() - t_start, 3)
            row = finite_json(row)
            rows.append(row)
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        window[0] = window[1] = 0.0

    bar = None
    if progress and ctx.is_main:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       TextColumn("{task.fields[info]}"), transient=True)
        bar_task = bar.add_task("train", total=tc.steps, completed=start, info="")
        bar.start()
    deadline = None if tc.max_minutes is None else t_start + 60 * tc.max_minutes
    stopped, done, last_ckpt = None, start, start
    try:
        if start == 0:
            evaluate(0)
        model.train()
        t_loop = time.perf_counter()
        for step in range(start, tc.steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            batch = task.batch(tc.seed, step, d.batch_size, d.seq_len)
            n_global = int(batch.loss_mask.sum())
            local = batch.rows(lo, hi).to(ctx.device)
            logits = net(local.idx, prefix_len=local.prefix_len)
            nll = F.cross_entropy(logits.flatten(0, 1), local.targets.flatten(), reduction="none")
            nll_sum = (nll * local.loss_mask.flatten()).sum()
            # DDP averages gradients over ranks: scale so the average is the gradient of the global mean
            (nll_sum * ctx.world_size / max(n_global, 1)).backward()
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_nll = float(nll_sum.detach())
            done = step + 1
            if not math.isfinite(step_nll):  # stop before a non-finite state is evaluated or checkpointed
                kept = f"the last checkpoint, step {last_ckpt}, is kept" if ckpt_path.is_file() else "no checkpoint"
                raise DivergedError(f"training diverged: the training loss is {step_nll} at step {done} "
                                    f"(optim.lr={cfg.optim.lr:g}); lower optim.lr ({kept})")
            window[0] += step_nll
            window[1] += float(local.loss_mask.sum())
            if deadline is not None:
                late = [float(time.perf_counter() >= deadline)]
                stopped = "max_minutes" if all_reduce_sum(late, ctx)[0] > 0 else None  # every rank agrees
            last = done == tc.steps or stopped is not None
            if done % tc.eval_every == 0 or last:
                evaluate(done)
                if bar is not None:
                    bar.update(bar_task, info=f"loss {rows[-1]['loss']:.3f} sink {rows[-1]['sink_ratio']:.2f}")
            if done % tc.ckpt_every == 0 or last:
                last_ckpt = done
                if ctx.is_main:
                    save_checkpoint(ckpt_path, {
                        "step": done, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "window": window, "rng": torch.get_rng_state(), "fingerprint": cfg.state_dict_fingerprint(),
                        "elapsed_s": prior_s + time.perf_counter() - t_start,
                    })
                barrier(ctx)
            if bar is not None:
                bar.update(bar_task, completed=done)
            if stop_after is not None and done >= stop_after:
                return None
            if stopped is not None:
                _log(ctx, f"stopped at step {done} of {tc.steps} after train.max_minutes={tc.max_minutes:g}; "
                          "rerun the same command to continue")
                break
    finally:
        if bar is not None:
            bar.stop()
    if not ctx.is_main:
        return None
    wall = prior_s + time.perf_counter() - t_start
    loop_s = time.perf_counter() - t_loop
    steps_run = done - start
    final = {**rows[-1], "wall_time_s": round(wall, 3), "session_wall_s": round(wall - prior_s, 3),
             "steps_planned": tc.steps, **({"stopped": stopped} if stopped else {}),
             "steps_this_session": steps_run,
             "train_tokens_per_s": round(steps_run * d.batch_size * d.seq_len / loop_s, 1) if steps_run else None,
             "world_size": ctx.world_size, "device": str(ctx.device), "params": model.num_params()}
    write_atomic(out / "final.json", json.dumps(finite_json(final), indent=1, allow_nan=False))
    if tc.plots:
        from sinkscope.training.plots import plot_dynamics

        save_figure_atomic(out / "dynamics.png", plot_dynamics(rows, title=out.name, eps=tc.eps), dpi=100)
    return RunResult(out, rows, final, wall)
