"""The lint rule set stated in pyproject.toml ([tool.ruff.lint]) holds over the whole repository (CI runs it here)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_finds_nothing() -> None:
    pytest.importorskip("ruff", reason="ruff comes with the `test` extra (pip install -e '.[test]')")
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    cmd = [ruff, "check", "--no-cache", str(ROOT)] if ruff else [sys.executable, "-m", "ruff", "check", "--no-cache",
                                                                  str(ROOT)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
