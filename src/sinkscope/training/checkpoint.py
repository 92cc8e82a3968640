"""Training checkpoints: written atomically (temp file + rename), checked against the run's config on load."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from sinkscope.errors import SinkscopeError

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


class CheckpointError(SinkscopeError):
    """A checkpoint is unreadable, or was written by a different model/optimiser/data config."""


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Save ``state`` (tensors, optimiser state, python scalars) atomically: a crash never leaves half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"format": FORMAT_VERSION, **state}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            d = _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    if a != b:
        return f"{prefix.rstrip('.')}: checkpoint has {a!r}, config has {b!r}"
    return None


def load_checkpoint(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Load a checkpoint and check it belongs to a run with this config ``fingerprint``.

    Raises:
        CheckpointError: the file cannot be read (corrupt/truncated), has an unknown format, or was written by
            a run whose model/data/optimiser settings differ (the message names the first differing key).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch raises many types for damaged files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({msg[:120]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not a sinkscope training checkpoint (format {FORMAT_VERSION})")
    diff = _first_difference(state.get("fingerprint"), fingerprint)
    if diff:
        raise CheckpointError(f"checkpoint {path} does not match the config ({diff}); use a new --out directory")
    return state
