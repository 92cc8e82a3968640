"""Distributed data parallel set-up: the same training run under ``torchrun`` (gloo on CPU, nccl on GPU).

Every rank builds the same global batch from (seed, step) and trains on its own rows; gradients are averaged
by DDP, and each rank's loss is scaled so that the averaged gradient equals the single-process gradient of the
global batch. Rank 0 evaluates, logs and checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sinkscope.devices import single_device


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: ``rank`` of ``world_size``, its device, and whether it is rank 0."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def rank_device(device: str, local_rank: int = 0) -> torch.device:
    """This rank's device: `sinkscope.devices.single_device` (``auto``: CUDA when available, else the CPU;
    an unknown or absent device is a one-line InputError), and under DDP a CUDA device becomes
    ``cuda:<local_rank>`` (one GPU per process)."""
    dev = single_device(device)
    if dev.type == "cuda" and dev.index is None:
        return torch.device(f"cuda:{local_rank}")
    return dev


def init_distributed(device_pref: str = "auto") -> DistContext:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1), else a single-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = rank_device(device_pref, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistContext(rank, world, local_rank, device)


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    """Sum a few floats over ranks (identity in a single process)."""
    if not ctx.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
