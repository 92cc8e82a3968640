"""Open an HTML page in headless Chromium (Debian's ``chromium``): the DOM after its scripts ran, its console
messages, a screenshot. Used to check reports in the tests and to make the screenshot in the docs
(``python experiments/report_screenshot.py PAGE.html OUT.png [WIDTH HEIGHT]``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sinkscope.errors import SinkscopeError

#: Flags for a quiet, offline, sandbox-less headless run (containers have no user namespaces).
FLAGS: tuple[str, ...] = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          "--disable-extensions", "--hide-scrollbars", "--mute-audio")
_CONSOLE = re.compile(r":CONSOLE(?:\(\d+\))?(?::\d+)?\]\s*(.*)$")


class BrowserUnavailable(SinkscopeError):
    """No chromium executable was found."""


@dataclass(frozen=True)
class PageLoad:
    """What the browser saw: the serialised DOM after load and every console message (text, source)."""

    dom: str
    console: list[str]
    stderr: str


def find_chromium() -> str:
    """Path of a Chromium executable (``chromium``, ``chromium-browser``, ``google-chrome``)."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise BrowserUnavailable("chromium not found; install it with `apt-get install -y chromium`")


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="sinkscope-chromium-") as profile:
        cmd = [find_chromium(), *FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def load_page(page: str | Path, *, timeout: float = 60.0, budget_ms: int | None = None) -> PageLoad:
    """Load ``page`` (a local file) and return its DOM after the scripts ran and its console messages.

    Console messages of every level (``console.log``, errors, uncaught exceptions, failed loads) are collected:
    Chromium logs them all as ``CONSOLE`` lines with ``--enable-logging=stderr``.
    """
    url = Path(page).absolute().as_uri()
    extra = [f"--virtual-time-budget={budget_ms}"] if budget_ms else []
    proc = _run(["--enable-logging=stderr", "--v=0", *extra, "--dump-dom", url], timeout)
    console = [m.group(1) for line in proc.stderr.splitlines() if (m := _CONSOLE.search(line))]
    if proc.returncode != 0 and not proc.stdout:
        raise SinkscopeError(f"chromium failed on {page} (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
    return PageLoad(dom=proc.stdout, console=console, stderr=proc.stderr)


def screenshot(page: str | Path, png: str | Path, *, width: int = 1280, height: int = 2400,
               timeout: float = 90.0) -> Path:
    """Save a PNG screenshot of the top ``width`` x ``height`` pixels of ``page``."""
    out = Path(png).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = _run([f"--screenshot={out}", f"--window-size={width},{height}", Path(page).absolute().as_uri()], timeout)
    if not out.is_file():
        raise SinkscopeError(f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
    return out
