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
    if p.is_dir():
        raise InputError(f"{what} {path} is a directory, not a file")
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
    """Fail early (InputError) if ``path`` could not be created or written, without creating anything; an empty
    path is refused (it would silently mean the current directory)."""
    if not str(path).strip():
        raise InputError("the output directory is empty: name a directory (--out DIR)")
    p = Path(path).absolute()
    if p.exists() and not p.is_dir():
        raise InputError(f"output path {p} exists and is not a directory")
    existing = p
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"output directory {p} cannot be made: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
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


def read_jsonl(path: str | Path, *, missing_ok: bool = True) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file, one a line: the one reader of cells, metrics and answers files.

    A missing file is an empty list (``missing_ok``); a last line cut short by a crash (no newline, not JSON) is
    dropped, since appends are whole lines; any other bad line raises InputError naming the file and line.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "cells.jsonl"
    >>> append_jsonl(p, {"a": 1}); append_jsonl(p, {"a": float("nan")})
    >>> read_jsonl(p)
    [{'a': 1}, {'a': None}]
    """
    p = Path(path)
    if not p.exists():
        if missing_ok:
            return []
        raise InputError(f"file not found: {p}")
    raw = p.read_bytes()
    lines = raw.split(b"\n")
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if i == len(lines) - 1:  # an unterminated last line: a write cut short
                break
            raise InputError(f"{p} line {i + 1} is not JSON ({e})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{p} line {i + 1} is not a JSON object")
        rows.append(obj)
    return rows


def append_jsonl(path: str | Path, *rows: dict[str, Any]) -> None:
    """Append ``rows`` as strict JSON lines (NaN and infinities as null) in one write, flushed to disk.

    A reader sees whole lines only, except after a crash mid-write, which `read_jsonl` tolerates on the last line;
    the next append cuts that torn line off (its row was never complete) before writing.
    """
    if not rows:
        return
    data = "".join(json.dumps(finite_json(r), allow_nan=False) + "\n" for r in rows).encode("utf-8")
    p = Path(path)
    if p.exists() and p.stat().st_size:
        _drop_torn_last_line(p)
    with open(p, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def check_resume_plan(out: str | Path, settings: dict[str, Any], *, kind: str, made: str,
                      name: str = "plan.json") -> None:
    """The settings a resumable output directory was made under, checked before anything is reused.

    A new directory gets ``settings`` written to ``out/name``; one whose plan equals ``settings`` resumes; any other
    is refused in one line naming the settings that differ (``kind``: what the plan file is, e.g. ``"sink-run plan"``;
    ``made``: what the directory holds, e.g. ``"cells measured"``).

    Raises:
        InputError: the plan file is not JSON, or it names other settings.
    """
    path = Path(out) / name
    if not path.is_file():
        write_json_atomic(path, settings)
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise InputError(f"{path} is not a {kind} ({e}); use another --out") from None
    if old != settings:
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        raise InputError(f"{out} holds {made} with other settings ({', '.join(diff)}): use another --out "
                         "(or the same settings to resume)")


def _drop_torn_last_line(p: Path) -> None:
    """Truncate ``p`` after its last newline (a crash can leave a partial last line)."""
    with open(p, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return
        pos = size
        while pos > 0:  # scan back in blocks for the last newline
            start = max(0, pos - 65536)
            f.seek(start)
            block = f.read(pos - start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                f.truncate(start + cut + 1)
                return
            pos = start
        f.truncate(0)


LOCK_NAME = ".sinkscope.lock"


class OutputLock:
    """An exclusive lock on an output directory, held for the life of a job: a second job on the same ``--out``
    is refused at once (InputError) instead of writing every row twice or losing a result.

    The lock is an ``fcntl.flock`` on ``DIR/.sinkscope.lock``: the kernel releases it when the process ends,
    so a crashed job never leaves a stale lock. The directory is created (checked first) when the lock is taken.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> with OutputLock(d):
    ...     try:
    ...         OutputLock(d).acquire()
    ...     except InputError as e:
    ...         print("in use by another sinkscope job" in str(e))
    True
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        import fcntl

        ensure_output_dir(self.directory)
        path = self.directory / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
            finally:
                os.close(fd)
            raise InputError(f"output directory {self.directory} is in use by another sinkscope job "
                             f"(pid {holder}): wait for it or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
