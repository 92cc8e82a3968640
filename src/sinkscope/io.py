"""File input and output: text inputs read with one-line errors, results written atomically (whole or not at all)."""

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
    """A UTF-8 text file's content; InputError if it is missing, blank or not text: NUL bytes or invalid UTF-8,
    which a binary file has (``what`` names it in the message)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} not found: {path}")
    data = p.read_bytes()
    if b"\x00" in data:
        raise InputError(f"{what} {path} is not text (it contains NUL bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {path} is not UTF-8 text (invalid byte at offset {e.start})") from None
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


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` whole or not at all: a temporary file in the same
    directory, flushed to disk, then renamed over ``path``. The one writer every result, checkpoint and
    manifest goes through.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> write_atomic(d / "a.txt", "hello")
    >>> (d / "a.txt").read_text(), sorted(p.name for p in d.iterdir())
    ('hello', ['a.txt'])
    """
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; results are meant to be shared
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def finite_json(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def write_json_atomic(path: str | Path, obj: Any, *, indent: int = 2) -> None:
    """``obj`` as JSON (NaN and infinities written as null), atomically."""
    write_atomic(path, json.dumps(finite_json(obj), indent=indent))


def write_csv_atomic(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Rows of dicts as CSV (header from the first row's keys), atomically."""
    rows = list(rows)
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    write_atomic(path, buf.getvalue())


def figure_bytes(fig: Any, fmt: str = "png", dpi: int = 120) -> bytes:
    """A matplotlib figure rendered to bytes (``fmt``: png, svg, pdf, ...); the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format=fmt, dpi=dpi)
    finally:
        plt.close(fig)
    return buf.getvalue()


def save_figure_atomic(path: str | Path, fig: Any, dpi: int = 120) -> None:
    """Write a figure (format from the suffix, default PNG) atomically and close it: the one figure saver."""
    write_atomic(path, figure_bytes(fig, Path(path).suffix.lstrip(".") or "png", dpi))
