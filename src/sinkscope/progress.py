"""Progress of long work: the one callback type every library function takes, and the one reporter that shows it.

Library functions never draw: they take ``progress: ProgressCallback | None`` and call it as work advances,
``progress(done, total, what)`` (``total`` None when unknown). The CLI (and a notebook user who wants it) makes
a `ProgressReporter`, which draws a rich bar on a terminal and, when the output is a file or a pipe, prints a
plain line every ``every_s`` seconds with the count, the rate and the time left, so a log written by
``sinkscope ... > log`` shows progress too.

>>> import io
>>> buf = io.StringIO()
>>> with ProgressReporter("profiling", stream=buf, every_s=0.0, unit="layers") as report:
...     for i in range(3):
...         report(i + 1, 3, "layer")
>>> buf.getvalue().splitlines()[-1].startswith("profiling: 3/3 layers")
True
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import IO, Any

#: ``progress(done, total, what)``: ``done`` units of ``total`` (None if unknown) finished; ``what`` says which.
ProgressCallback = Callable[[int, "int | None", str], None]


def format_seconds(seconds: float) -> str:
    """``75.2`` -> ``'1:15'``, ``3725`` -> ``'1:02:05'``; ``'?'`` for a value that is not finite.

    >>> format_seconds(75.2), format_seconds(3725), format_seconds(float("nan"))
    ('1:15', '1:02:05', '?')
    """
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class ProgressReporter:
    """Shows progress for one job: a rich bar on a terminal, periodic plain lines otherwise.

    Use as a context manager and pass the instance wherever a `ProgressCallback` is taken.

    Args:
        label: what the job is ("profiling", "scan cells").
        stream: where to write (default: standard error).
        every_s: plain-line mode: at most one line per this many seconds (the last update always prints).
        unit: the unit of the counts ("layers", "tokens").
        plain: force plain lines (True) or the bar (False); None decides by ``stream.isatty()``.
    """

    def __init__(self, label: str, *, stream: IO[str] | None = None, every_s: float = 10.0, unit: str = "",
                 plain: bool | None = None) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        self.unit = unit
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.plain = (not isatty()) if plain is None else plain
        self._start = 0.0
        self._last_line = -math.inf
        self._last: tuple[int, int | None, str] | None = None
        self._printed_last = False
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> ProgressReporter:
        self._start = time.monotonic()
        if not self.plain:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn(self.unit), TimeElapsedColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[what]}"), console=Console(file=self.stream),
                                 transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=None, what="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
            self._bar = None
        elif self._last is not None and not self._printed_last:
            self._line(*self._last)

    def __call__(self, done: int, total: int | None = None, what: str = "") -> None:
        """Record that ``done`` of ``total`` units are finished (``what``: the current item, optional)."""
        self._last = (done, total, what)
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total, what=what)
            return
        now = time.monotonic()
        finished = total is not None and done >= total
        self._printed_last = False
        if finished or now - self._last_line >= self.every_s:
            self._line(done, total, what)
            self._last_line = now

    def message(self, text: str) -> None:
        """A line of its own (a phase change, a warning) that does not disturb the bar."""
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            print(text, file=self.stream, flush=True)

    def _line(self, done: int, total: int | None, what: str) -> None:
        elapsed = time.monotonic() - self._start
        rate = done / elapsed if elapsed > 0 else float("nan")
        unit = f" {self.unit}" if self.unit else ""
        count = f"{done}/{total}{unit}" if total is not None else f"{done}{unit}"
        parts = [f"{self.label}: {count}"]
        if total:
            parts.append(f"{100.0 * done / total:.0f}%")
        parts.append(f"{rate:.3g}/s" if math.isfinite(rate) else "?/s")
        parts.append(f"elapsed {format_seconds(elapsed)}")
        if total is not None and math.isfinite(rate) and rate > 0:
            parts.append(f"left {format_seconds((total - done) / rate)}")
        if what:
            parts.append(what)
        print(", ".join(parts), file=self.stream, flush=True)
        self._printed_last = True


def no_progress(done: int, total: int | None = None, what: str = "") -> None:
    """A `ProgressCallback` that shows nothing (the library's default)."""
