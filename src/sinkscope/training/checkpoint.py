"""Training checkpoints: written atomically (`sinkscope.io.write_atomic`), read without unpickling code
(``torch.load(weights_only=True)``), checked against the run's config on load."""

from __future__ import annotations

import io
import pickle
import re
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


def _first_words(e: BaseException, limit: int = 120) -> str:
    """The first line of an exception's message, shortened at a word boundary to at most ``limit`` characters."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    if len(line) <= limit:
        return line
    return line[:limit].rsplit(" ", 1)[0].rstrip(" .,;:") + " ..."


def _weights_only_reason(text: str) -> str:
    """The short reason in torch's weights-only error (e.g. ``Unsupported operand 111``), or ''."""
    found = re.search(r"^(Unsupported [^\n]*)$", text, re.MULTILINE)
    return found.group(1).strip() if found else ""


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
    except pickle.UnpicklingError as e:
        text = str(e)
        found = re.search(r"\bGLOBAL (\S+)", text)
        if found:  # torch's weights-only unpickler refused a global: the file pickles Python objects (code)
            raise CheckpointError(f"checkpoint {path} holds pickled Python objects ({found.group(1)}), which are "
                                  "refused: only tensors and plain containers are read (weights_only=True); "
                                  "it was not written by sinkscope train") from None
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable (not a torch checkpoint of tensors"
                              f"{': ' + _weights_only_reason(text) if _weights_only_reason(text) else ''})") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for damaged files
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({_first_words(e)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not a sinkscope training checkpoint (format {FORMAT_VERSION})")
    diff = _first_difference(state.get("fingerprint"), fingerprint)
    if diff:
        raise CheckpointError(f"checkpoint {path} does not match the config ({diff}); use a new --out directory")
    return state
