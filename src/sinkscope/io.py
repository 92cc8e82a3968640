"""Atomic file output: results appear whole or not at all (write to a temp file, then rename)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sinkscope.errors import InputError


def read_text_file(path: str | Path, what: str = "input file") -> str:
    """A UTF-8 text file's content; InputError if it is missing or blank (``what`` names it in the message)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} not found: {path}")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise InputError(f"{what} is empty: {path}")
    return text


def check_output_dir(path: str | Path) -> Path:
    """Fail early (InputError) if ``path`` could not be created or written, without creating anything."""
    p = Path(path).absolute()
    if p.exists() and not p.is_dir():
        raise InputError(f"output path {p} exists and is not a directory")
    existing = p
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"output directory {p} is not writable")
    return p


def ensure_output_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and check it is writable; InputError (one line) otherwise."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create output directory {p}: {e.strerror or e}") from e
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        raise InputError(f"output directory {p} is not writable")
    return p


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; results are meant to be shared
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _clean(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_bytes_atomic(path, json.dumps(_clean(obj), indent=2).encode())


def write_csv_atomic(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    rows = list(rows)
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    write_bytes_atomic(path, buf.getvalue().encode())


def save_figure_atomic(path: str | Path, fig: Any, dpi: int = 120) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", dpi=dpi)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
