"""Benchmark: training tokens/s of sinkscope's loop vs a bare PyTorch loop over the same model and batches.

    python bench/bench_training.py [--config configs/bb-base.yaml] [--steps 300] [--repeats 2] [--out FILE.json]

Both loops train the same tinygpt on the same (seed, step) batches with the same optimiser, clipping and
schedule. Ours also evaluates the sink/drain/peak metrics every 100 steps (``train.eval_every=100``) and
writes metrics.jsonl; the checkpoint is written once at the end. Runs alternate (bare, ours, bare, ours, ...)
and the best of each is compared, since the machine may be shared. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def bare_loop(cfg, steps: int) -> float:
    """Tokens/s of a plain loop: batch, forward, masked CE, backward, clip, AdamW/SGD step."""
    from sinkscope.models.tinygpt import TinyGPT
    from sinkscope.training.loop import build_task, lr_at, make_optimizer, resolve_config

    task = build_task(cfg.data)
    cfg = resolve_config(cfg, task)
    torch.manual_seed(cfg.train.seed)
    model = TinyGPT(cfg.model)
    opt = make_optimizer(model, cfg)
    d = cfg.data
    t0 = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        b = task.batch(cfg.train.seed, step, d.batch_size, d.seq_len)
        logits = model(b.idx, prefix_len=b.prefix_len)
        nll = F.cross_entropy(logits.flatten(0, 1), b.targets.flatten(), reduction="none")
        loss = (nll * b.loss_mask.flatten()).sum() / b.loss_mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())  # the logging read-back a real loop does
    return steps * d.batch_size * d.seq_len / (time.perf_counter() - t0)


def our_loop(cfg, steps: int) -> float:
    from sinkscope.training.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        res = train(cfg, Path(tmp) / "run", argv=["bench"])
    return float(res.final["train_tokens_per_s"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/bb-base.yaml")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    from sinkscope.training.config import load_config

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [f"train.steps={args.steps}", "train.eval_every=100",
                                    f"train.ckpt_every={args.steps}", "train.plots=false",
                                    f"train.threads={args.threads}"])
    bare, ours = [], []
    for _ in range(args.repeats):
        bare.append(bare_loop(cfg, args.steps))
        ours.append(our_loop(cfg, args.steps))
    result = {
        "config": args.config, "steps": args.steps, "threads": args.threads, "repeats": args.repeats,
        "tokens_per_step": cfg.data.batch_size * cfg.data.seq_len,
        "bare_tokens_per_s": [round(x, 1) for x in bare], "ours_tokens_per_s": [round(x, 1) for x in ours],
        "overhead_pct_best": round(100 * (1 - max(ours) / max(bare)), 2),
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
