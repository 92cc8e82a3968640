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
from sinkscope.models.tiny import save_tiny, tiny_model


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
