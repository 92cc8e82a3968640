"""Training checkpoints: written atomically (`sinkscope.io.write_atomic`), read without unpickling code
(``torch.load(weights_only=True)``), checked against the run's config on load."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from sinkscope.errors import SinkscopeError
from sinkscope.io import write_atomic

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


class CheckpointError(SinkscopeError):
    """A checkpoint is unreadable, or was written by a different model/optimiser/data config."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Save ``state`` atomically: a crash never leaves half a file.

    ``state`` holds only what ``torch.load(weights_only=True)`` reads back: tensors, dicts, lists, tuples,
    strings and numbers (model and optimiser state dicts, the RNG state tensor, the config fingerprint).
    """
    buf = io.BytesIO()
    torch.save({"format": FORMAT_VERSION, **state}, buf)
    write_atomic(path, buf.getvalue())


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

    The file is read with ``weights_only=True``: a checkpoint that carries a pickled object (code) is refused
    before anything in it runs.

    Raises:
        CheckpointError: the file cannot be read (corrupt/truncated, or it holds pickled objects other than
            tensors and plain containers), has an unknown format, or was written by a run whose
            model/data/optimiser settings differ (the message names the first differing key).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for damaged files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({msg[:120]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not a sinkscope training checkpoint (format {FORMAT_VERSION})")
    diff = _first_difference(state.get("fingerprint"), fingerprint)
    if diff:
        raise CheckpointError(f"checkpoint {path} does not match the config ({diff}); use a new --out directory")
    return state
