"""Saved artefacts: the registry of kinds that load_model opens, manifests written atomically, and a patch
handle that forgets itself on removal."""

from __future__ import annotations

import pytest
import torch

import sinkscope
from sinkscope.artefacts import MANIFEST_NAME, read_manifest, write_manifest
from sinkscope.errors import ModelLoadError
from sinkscope.interventions.patch import NeuronRule, SinkPatch, apply_patch, save_patch
from sinkscope.models.load import load_model
from sinkscope.models.random_hf import save_tiny, tiny_model


def test_unknown_kind_is_one_line(tmp_path) -> None:
    write_manifest(tmp_path / "a", {"kind": "nope"})
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [MANIFEST_NAME]  # no temporary file left
    assert read_manifest(tmp_path / "a") == {"kind": "nope"}
    with pytest.raises(ModelLoadError, match="kind 'nope' is not registered") as e:
        load_model(tmp_path / "a")
    assert "\n" not in str(e.value)
    (tmp_path / "a" / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ModelLoadError, match="broken manifest"):
        read_manifest(tmp_path / "a")


def test_a_manifest_that_is_not_json_is_named_as_such(tmp_path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / MANIFEST_NAME).write_text('{"kind": "repeat_patch", ')
    with pytest.raises(ModelLoadError) as e:
        load_model(tmp_path / "p")
    assert "not valid JSON" in str(e.value) and "not registered" not in str(e.value) and "\n" not in str(e.value)


def test_a_saved_patch_opens_from_the_plain_loader_in_a_fresh_process(tmp_path) -> None:
    """Artefact kinds are found by import string: no entry point has to import their owners first."""
    import subprocess
    import sys

    base = save_tiny(str(tmp_path / "llama"))
    patched = save_patch(SinkPatch([NeuronRule(1, [0], [0.1], [0.0])], base), tmp_path / "patched")
    code = ("import sys; from sinkscope.models.load import load_model; m, _ = load_model(sys.argv[1]); "
            "print(type(m.sinkscope_patch).__name__, 'sinkscope.interventions.patch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(patched)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["PatchHandle", "True"]


def test_saved_patch_loads_and_remove_clears_the_handle(tmp_path) -> None:
    base = save_tiny(str(tmp_path / "llama"))
    patch = SinkPatch([NeuronRule(1, [0, 3], [0.1, 0.1], [0.0, 0.0])], base)
    model, _ = sinkscope.load_model(save_patch(patch, tmp_path / "patched"))
    handle = model.sinkscope_patch
    assert handle.patch.rules == patch.rules and model.sinkscope_source.kind == "manifest"
    handle.remove()
    assert not hasattr(model, "sinkscope_patch")
    plain = tiny_model("llama")
    with apply_patch(plain, patch) as h:
        assert plain.sinkscope_patch is h
        plain(input_ids=torch.tensor([[1, 5, 6]]))
    assert not hasattr(plain, "sinkscope_patch")
