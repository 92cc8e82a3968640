"""The import layers (pyproject's import-linter contracts): kept by the package, and broken by an upward import
or a cycle, so the suite fails on either."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"


def _lint(src: Path) -> subprocess.CompletedProcess[str]:
    code = (f"import sys; sys.path.insert(0, {str(src)!r}); from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(PYPROJECT)!r}, no_cache=True))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=src)


def test_contracts_kept() -> None:
    res = _lint(ROOT / "src")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 kept, 0 broken" in res.stdout


@pytest.mark.parametrize("module,line,needle", [
    ("models/random_hf.py", "import sinkscope.training.loop", "sinkscope.models.random_hf -> sinkscope.training.loop"),
    ("training/ddp.py", "from sinkscope.training.loop import train", "no import cycles between sibling modules BROKEN"),
])
def test_upward_import_or_cycle_breaks_a_contract(tmp_path: Path, module: str, line: str, needle: str) -> None:
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "sinkscope", src / "sinkscope", ignore=shutil.ignore_patterns("__pycache__", "data"))
    with (src / "sinkscope" / module).open("a") as f:
        f.write(f"\n{line}  # noqa\n")
    res = _lint(src)
    assert res.returncode != 0 and needle in res.stdout, res.stdout + res.stderr
