"""The public API type-checks: mypy, with pyproject's ``[tool.mypy]``, on every module behind a `sinkscope` export
(`sinkscope._EXPORTS`) and on the package itself; the modules they import are followed silently (issue 20).

mypy keeps its cache in the system temp directory, shared between runs: a warm run re-checks only what changed
(seconds); the first run on a machine analyses torch and transformers too (about a minute).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sinkscope import _EXPORTS

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"


def public_modules() -> list[str]:
    """The package and every module an export resolves to (``"module:attribute"``), sorted."""
    return sorted({"sinkscope", *(target.split(":")[0] for target in _EXPORTS.values())})


def test_public_api_type_checks() -> None:
    pytest.importorskip("mypy", reason="mypy is not installed (the `test` extra installs it)")
    modules = public_modules()
    cache = Path(tempfile.gettempdir()) / "sinkscope-mypy-cache"
    args = [sys.executable, "-m", "mypy", "--config-file", str(PYPROJECT), "--cache-dir", str(cache)]
    for module in modules:
        args += ["-m", module]
    res = subprocess.run(args, capture_output=True, text=True, cwd=ROOT / "src")
    output = res.stdout + res.stderr
    assert res.returncode == 0, f"mypy on the public API ({' '.join(modules)}):\n{output}"
    checked = re.search(r"Success: no issues found in (\d+) source files", output)
    assert checked is not None and int(checked.group(1)) >= len(modules), output
