"""Run one training config as several local processes (CPU, gloo), like ``torchrun --nproc_per_node N``: for
tests and laptops. It sits above `sinkscope.training.loop` (which uses `sinkscope.training.ddp`)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch

from sinkscope.training.config import config_from_dict
from sinkscope.training.loop import train


def free_port() -> int:
    """A free TCP port on localhost for the process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world_size: int, port: int, cfg_dict: dict[str, Any], out: str, threads: int) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(threads)
    train(config_from_dict(cfg_dict), Path(out))


def run_local_processes(cfg_dict: dict[str, Any], out: str | Path, world_size: int = 2, threads: int = 1) -> None:
    """Run one training config as ``world_size`` local CPU processes (gloo), like ``torchrun --nproc_per_node``."""
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(world_size, free_port(), cfg_dict, str(out), threads), nprocs=world_size, join=True)
