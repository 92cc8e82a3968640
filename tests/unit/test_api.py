"""The public API: every lazily exported name resolves, and `import sinkscope` loads no transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest

import sinkscope


@pytest.mark.parametrize("name", sorted(sinkscope._EXPORTS))
def test_export_resolves(name: str) -> None:
    assert getattr(sinkscope, name) is not None


def test_unknown_name_raises() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sinkscope.nope  # noqa: B018


def test_import_is_light() -> None:
    code = "import sys, sinkscope; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
