"""The public API: every lazily exported name resolves, and `import sinkscope` loads no transformers."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import sinkscope


@pytest.mark.parametrize("name", sorted(sinkscope._EXPORTS))
def test_export_is_the_object_its_import_string_names(name: str) -> None:
    module, attr = sinkscope._EXPORTS[name].split(":")
    target = getattr(importlib.import_module(module), attr)
    assert getattr(sinkscope, name) is target and (callable(target) or isinstance(target, type))


def test_the_public_loader_is_the_plain_loader() -> None:
    """No wrapper that registers artefact kinds first: one loader, whatever the entry point."""
    from sinkscope.models.load import load_model

    assert sinkscope.load_model is load_model


def test_unknown_name_raises() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sinkscope.nope  # noqa: B018


def test_import_is_light() -> None:
    code = "import sys, sinkscope; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
