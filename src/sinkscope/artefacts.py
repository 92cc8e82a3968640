"""Saved sinkscope artefacts that `sinkscope.load_model` opens like a model: a registry of kinds.

A kind is a name, a test that recognises its directory and a loader returning ``(model, tokenizer)``. The
modules that own an artefact register it here (saved patches: `sinkscope.interventions.patch`; training runs:
`sinkscope.training.run`), so the model loader, below them, never imports them; `sinkscope.plugins` imports
every built-in owner once (the public ``sinkscope.load_model`` and the CLI do). Manifest-based artefacts
keep ``sinkscope_manifest.json`` (with its ``kind``) in their directory, read and written here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sinkscope.errors import ModelLoadError
from sinkscope.io import write_json_atomic
from sinkscope.registry import Registry

#: A directory holding this file is a manifest-based sinkscope artefact (e.g. a saved patch).
MANIFEST_NAME = "sinkscope_manifest.json"


@dataclass(frozen=True)
class ArtefactKind:
    """One kind of saved artefact.

    Attributes:
        name: the kind (the manifest's ``kind`` for manifest-based artefacts).
        detect: ``detect(directory) -> bool``: the directory holds this kind.
        load: ``load(directory, **load_model_kwargs) -> (model, tokenizer)``.
    """

    name: str
    detect: Callable[[Path], bool]
    load: Callable[..., tuple[Any, Any]]


ARTEFACT_KINDS: Registry[ArtefactKind] = Registry("artefact kind")


def register_artefact(name: str, load: Callable[..., tuple[Any, Any]],
                      detect: Callable[[Path], bool] | None = None) -> ArtefactKind:
    """Register a kind; without ``detect`` it is the manifest-based kind ``name``."""
    kind = ArtefactKind(name, detect or (lambda d: manifest_kind(d) == name), load)
    return ARTEFACT_KINDS.add(name, kind)


def manifest_kind(directory: str | Path) -> str | None:
    """The ``kind`` of the manifest in ``directory`` (None without a readable manifest)."""
    try:
        return read_manifest(directory).get("kind")
    except ModelLoadError:
        return None


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of an artefact directory.

    Raises:
        ModelLoadError: no manifest, or not a JSON object.
    """
    p = Path(directory) / MANIFEST_NAME
    if not p.is_file():
        raise ModelLoadError(f"no {MANIFEST_NAME} in {directory}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"broken manifest {p}: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"broken manifest {p}: not a JSON object")
    return data


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``directory/sinkscope_manifest.json`` atomically (the directory is created); returns the directory."""
    if "kind" not in manifest:
        raise ValueError("a manifest names its kind")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    write_json_atomic(d / MANIFEST_NAME, manifest, indent=1)
    return d


def detect_artefact(directory: str | Path) -> ArtefactKind | None:
    """The registered kind whose test recognises ``directory``, if any."""
    d = Path(directory)
    for name in ARTEFACT_KINDS:
        kind = ARTEFACT_KINDS[name]
        if kind.detect(d):
            return kind
    return None
