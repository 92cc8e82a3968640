"""The training loop: ``train(cfg, out) -> RunResult``, resumable, deterministic on CPU, DDP-ready.

Output directory: ``config.yaml`` (resolved config + argv), ``task.json`` (what the task was built from, e.g.
the held-out files of a text corpus), ``metrics.jsonl`` (one row per evaluation step, see
:mod:`sinkscope.training.metrics`), ``checkpoint.pt`` (every ``train.ckpt_every`` steps, atomic),
``final.json`` (the last row plus wall time and throughput) and ``dynamics.png`` (`RunResult.save`). The
directory is locked for the run (`sinkscope.io.OutputLock`): a second run on the same ``out`` is refused.

A non-finite training loss stops the run with :class:`DivergedError` (nothing non-finite is written, the last
checkpoint is kept); ``train.max_minutes`` ends a run early at a clean step (evaluated, checkpointed, resumable).

Batches are a pure function of (seed, step) and the model has no dropout, so a run killed and resumed from
its checkpoint logs exactly the losses of an uninterrupted run.

The loop draws nothing: it reports each step to a `sinkscope.progress.ProgressCallback` and its notices
(resuming, stopped early) to a ``log`` callable; the CLI passes a `sinkscope.progress.ProgressReporter`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sinkscope.devices import parse_device
from sinkscope.errors import InputError, SinkscopeError
from sinkscope.io import (
    OutputLock,
    append_jsonl,
    check_output_dir,
    finite_json,
    read_jsonl,
    save_figure_atomic,
    write_atomic,
    write_json_atomic,
)
from sinkscope.models.tinygpt import TinyGPT
from sinkscope.progress import ProgressCallback
from sinkscope.tasks.batch import LMBatch
from sinkscope.training.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from sinkscope.training.config import ConfigError, DataConfig, RunConfig
from sinkscope.training.ddp import DistContext, all_reduce_sum, barrier, init_distributed, shutdown
from sinkscope.training.metrics import measure_model


class DivergedError(SinkscopeError):
    """The training loss became NaN or infinite (usually a learning rate far too large)."""


@dataclass
class RunResult:
    """What a finished run produced: its directory, all metric rows, the final row, wall time (s), and what
    `save` writes beside them (the resolved config as YAML with its argv header, the sink threshold ``eps`` and
    whether to draw ``dynamics.png``)."""

    out: Path
    rows: list[dict[str, Any]]
    final: dict[str, Any]
    wall_s: float
    config_yaml: str = ""
    eps: float | None = None
    plots: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"out": str(self.out), "final": self.final, "wall_s": self.wall_s}

    def save(self, directory: str | Path) -> list[Path]:
        """Write ``config.yaml``, ``metrics.jsonl``, ``final.json`` (strict JSON: NaN as null) and, with
        ``plots``, ``dynamics.png`` into ``directory`` (atomically; created). Returns the paths written."""
        from sinkscope.io import ensure_output_dir
        from sinkscope.viz.training import plot_dynamics

        d = ensure_output_dir(directory)
        written = []
        if self.config_yaml:
            write_atomic(d / "config.yaml", self.config_yaml)
            written.append(d / "config.yaml")
        write_atomic(d / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))
        write_json_atomic(d / "final.json", self.final, indent=1)
        written += [d / "metrics.jsonl", d / "final.json"]
        if self.plots:
            save_figure_atomic(d / "dynamics.png", plot_dynamics(self.rows, title=Path(self.out).name, eps=self.eps),
                               dpi=100)
            written.append(d / "dynamics.png")
        return written


def build_task(data: DataConfig):
    """The task object of ``data.task`` (BigramBackcopy or TextLM); raises InputError for a missing file."""
    if data.task == "bigram_backcopy":
        from sinkscope.corpora import corpus_path
        from sinkscope.tasks.bigram_backcopy import BigramBackcopy

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
    """AdamW or SGD with momentum; weight decay on matrices only (not norms, biases, bias slots) or, with
    ``optim.decay=all``, on every parameter (Gu et al.)."""
    o = cfg.optim
    if o.decay == "all":
        groups = [{"params": list(model.parameters()), "weight_decay": o.weight_decay}]
    else:
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




def train(cfg: RunConfig, out: str | Path, *, resume: bool = True, progress: ProgressCallback | None = None,
          log: Callable[[str], None] | None = None, stop_after: int | None = None,
          argv: list[str] | None = None) -> RunResult | None:
    """Train a tinygpt on ``cfg.data.task`` and write the run directory ``out``.

    Args:
        cfg: the run config.
        out: output directory (created, and locked for the run). An existing checkpoint there is resumed when
            ``resume``.
        progress: called after every step as ``progress(step, train.steps, "eval loss L, Sink_0 S")`` (the last
            evaluation row; rank 0).
        log: receives the run's notices (resuming from a step, stopped at ``train.max_minutes``), rank 0.
        stop_after: stop right after this step as if killed (no final outputs; for resume tests).
        argv: the command line to record in ``config.yaml``.
    Returns:
        The :class:`RunResult` on rank 0 when the run finished (or stopped at ``train.max_minutes``), else None.
    Raises:
        ConfigError / InputError / CheckpointError: one-line user errors (device and ``out`` are checked first;
            ``out`` in use by another run; ``train.steps`` below the checkpoint's step).
        DivergedError: the training loss became non-finite.
    """
    t_start = time.perf_counter()
    out = Path(out)
    try:
        parse_device(cfg.train.device, param="train.device")  # tpu, or cuda on a machine without: one line
    except InputError as e:
        raise ConfigError(str(e)) from None
    check_output_dir(out)
    ctx: DistContext = init_distributed(cfg.train.device)
    lock = OutputLock(out) if ctx.is_main else None
    try:
        if lock is not None:
            lock.acquire()
        session = _Session(cfg, out, ctx, progress, log if ctx.is_main else None, t_start)
        return session.run(resume, stop_after, argv)
    finally:
        if lock is not None:
            lock.release()
        shutdown(ctx)


class _Session:
    """One session of a run (from a fresh start or a checkpoint to the end or a stop), on one rank."""

    def __init__(self, cfg: RunConfig, out: Path, ctx: DistContext, progress: ProgressCallback | None,
                 log: Callable[[str], None] | None, t_start: float) -> None:
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if ctx.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on GPUs (CPU runs stay exact fp32)
            torch.backends.cudnn.allow_tf32 = True
        self.task = build_task(cfg.data)
        self.cfg = cfg = resolve_config(cfg, self.task)
        if cfg.data.batch_size % ctx.world_size:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not divisible by the {ctx.world_size} "
                              "processes")
        self.out, self.ctx, self.t_start = out, ctx, t_start
        self.progress = progress if ctx.is_main else None
        self.log = log or (lambda message: None)
        self.metrics_path, self.ckpt_path = out / "metrics.jsonl", out / CHECKPOINT_NAME
        torch.manual_seed(cfg.train.seed)
        self.model = TinyGPT(cfg.model).to(ctx.device)
        self.optimizer = make_optimizer(self.model, cfg)
        self.start, self.window = 0, [0.0, 0.0]  # window: summed train NLL and token count since the last eval
        self.prior_s = 0.0  # wall time of earlier sessions of this run (resume)
        self.rows: list[dict[str, Any]] = []

    def resume(self) -> None:
        """Load the checkpoint of ``out``: weights, optimiser, step, RNG and the metric rows up to its step."""
        tc = self.cfg.train
        state = load_checkpoint(self.ckpt_path, self.cfg.state_dict_fingerprint())
        step = int(state["step"])
        if step > tc.steps:
            raise ConfigError(f"train.steps={tc.steps} is below the step of the checkpoint in {self.out} "
                              f"({step}); raise train.steps to continue it, or start over (--fresh) or in "
                              "another --out")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.start, self.window = step, list(state["window"])
        self.prior_s = float(state.get("elapsed_s", 0.0))
        torch.set_rng_state(state["rng"])
        self.rows = [r for r in read_jsonl(self.metrics_path) if r["step"] <= step]
        self.log(f"resuming {self.out} from step {step} of {tc.steps} ({self.ckpt_path.name})")

    def config_yaml(self, argv: list[str] | None) -> str:
        return f"# argv: {json.dumps(argv if argv is not None else sys.argv)}\n" + self.cfg.to_yaml()

    def evaluate(self, step: int, eval_batch: LMBatch) -> None:
        """Append one metrics row (rank 0) and reset the training-loss window."""
        cfg, d, tc = self.cfg, self.cfg.data, self.cfg.train
        s, n = all_reduce_sum(self.window, self.ctx)
        if self.ctx.is_main:
            row = {"step": step, "lr": lr_at(max(step - 1, 0), cfg), "train_loss": s / n if n else None,
                   "tokens": step * d.batch_size * d.seq_len}
            row.update(measure_model(self.model, eval_batch, eps=tc.eps, dormant_threshold=tc.dormant_threshold))
            if not math.isfinite(row["loss"]):
                raise DivergedError(f"training diverged: the evaluation loss is {row['loss']} at step {step} "
                                    f"(optim.lr={cfg.optim.lr:g}); lower optim.lr")
            row["wall_s"] = round(self.prior_s + time.perf_counter() - self.t_start, 3)
            row = finite_json(row)  # NaN/inf -> None: what is written stays strict JSON
            append_jsonl(self.metrics_path, row)
            self.rows.append(row)
        self.window[0] = self.window[1] = 0.0

    def save_checkpoint(self, done: int) -> None:
        if self.ctx.is_main:
            save_checkpoint(self.ckpt_path, {
                "step": done, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "window": self.window, "rng": torch.get_rng_state(), "fingerprint": self.cfg.state_dict_fingerprint(),
                "elapsed_s": self.prior_s + time.perf_counter() - self.t_start,
            })
        barrier(self.ctx)

    def run(self, resume: bool, stop_after: int | None, argv: list[str] | None) -> RunResult | None:
        cfg, ctx, tc, d = self.cfg, self.ctx, self.cfg.train, self.cfg.data
        if resume and self.ckpt_path.is_file():
            self.resume()
        barrier(ctx)
        if ctx.is_main:
            write_atomic(self.out / "config.yaml", self.config_yaml(argv))
            write_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.rows))
            if hasattr(self.task, "describe"):
                write_atomic(self.out / "task.json", json.dumps(self.task.describe(), indent=1))
        net: nn.Module = self.model
        if ctx.distributed:
            net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        eval_batch = evaluation_batch(self.task, cfg).to(ctx.device)
        local_b = d.batch_size // ctx.world_size
        lo, hi = ctx.rank * local_b, (ctx.rank + 1) * local_b
        deadline = None if tc.max_minutes is None else self.t_start + 60 * tc.max_minutes
        stopped, done, last_ckpt = None, self.start, self.start
        if self.progress is not None:
            self.progress(self.start, tc.steps, "")
        if self.start == 0:
            self.evaluate(0, eval_batch)
        self.model.train()
        t_loop = time.perf_counter()
        for step in range(self.start, tc.steps):
            step_nll, n_tokens = self.step(net, step, lo, hi)
            done = step + 1
            if not math.isfinite(step_nll):  # stop before a non-finite state is evaluated or checkpointed
                kept = f"the last checkpoint, step {last_ckpt}, is kept" if self.ckpt_path.is_file() else \
                    "no checkpoint"
                raise DivergedError(f"training diverged: the training loss is {step_nll} at step {done} "
                                    f"(optim.lr={cfg.optim.lr:g}); lower optim.lr ({kept})")
            self.window[0] += step_nll
            self.window[1] += n_tokens
            if deadline is not None:
                late = [float(time.perf_counter() >= deadline)]
                stopped = "max_minutes" if all_reduce_sum(late, ctx)[0] > 0 else None  # every rank agrees
            last = done == tc.steps or stopped is not None
            if done % tc.eval_every == 0 or last:
                self.evaluate(done, eval_batch)
            if done % tc.ckpt_every == 0 or last:
                last_ckpt = done
                self.save_checkpoint(done)
            if self.progress is not None:
                last_row = self.rows[-1] if self.rows else {}
                self.progress(done, tc.steps, f"eval loss {last_row['loss']:.3f}, Sink_0 {last_row['sink_ratio']:.2f}"
                              if "loss" in last_row and "sink_ratio" in last_row else "")
            if stop_after is not None and done >= stop_after:
                return None
            if stopped is not None:
                self.log(f"stopped at step {done} of {tc.steps} after train.max_minutes={tc.max_minutes:g}; "
                         "rerun the same command to continue")
                break
        if not ctx.is_main:
            return None
        result = self.result(done, stopped, time.perf_counter() - t_loop, argv)
        result.save(self.out)  # final.json, dynamics.png; config.yaml and metrics.jsonl again (the same bytes)
        return result

    def step(self, net: nn.Module, step: int, lo: int, hi: int) -> tuple[float, float]:
        """One optimiser step on this rank's rows ``lo:hi`` of the global batch; returns this rank's summed
        training NLL and its number of loss tokens."""
        cfg, d = self.cfg, self.cfg.data
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = self.task.batch(cfg.train.seed, step, d.batch_size, d.seq_len)
        n_global = int(batch.loss_mask.sum())
        local = batch.rows(lo, hi).to(self.ctx.device)
        logits = net(local.idx, prefix_len=local.prefix_len)
        nll = F.cross_entropy(logits.flatten(0, 1), local.targets.flatten(), reduction="none")
        nll_sum = (nll * local.loss_mask.flatten()).sum()
        # DDP averages gradients over ranks: scale so the average is the gradient of the global mean
        (nll_sum * self.ctx.world_size / max(n_global, 1)).backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(nll_sum.detach()), float(local.loss_mask.sum())

    def result(self, done: int, stopped: str | None, loop_s: float, argv: list[str] | None) -> RunResult:
        """The run's `RunResult`: the last metrics row plus wall time, throughput, world size and device."""
        tc, d = self.cfg.train, self.cfg.data
        wall = self.prior_s + time.perf_counter() - self.t_start
        steps_run = done - self.start
        final = {**self.rows[-1], "wall_time_s": round(wall, 3), "session_wall_s": round(wall - self.prior_s, 3),
                 "steps_planned": tc.steps, **({"stopped": stopped} if stopped else {}),
                 "steps_this_session": steps_run,
                 "train_tokens_per_s": round(steps_run * d.batch_size * d.seq_len / loop_s, 1) if steps_run else None,
                 "world_size": self.ctx.world_size, "device": str(self.ctx.device), "params": self.model.num_params()}
        return RunResult(self.out, self.rows, final, wall, config_yaml=self.config_yaml(argv), eps=tc.eps,
                         plots=tc.plots)
