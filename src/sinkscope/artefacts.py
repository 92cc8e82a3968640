"""Saved sinkscope artefacts that `sinkscope.load_model` opens like a model: a table of kinds, resolved lazily.

A kind is a name, a test that recognises its directory and a loader returning ``(model, tokenizer)``. The
built-in kinds are named here by import string (``"module:function"``) and imported only when a directory is
tested or loaded, so the model loader, below their owners in the import layers, never imports them and every
entry point (``sinkscope.models.load.load_model``, ``sinkscope.load_model``, the CLI) opens them alike: nothing
has to be imported first. Manifest-based artefacts keep ``sinkscope_manifest.json`` (with its ``kind``) in their
directory, read and written here. `register_artefact` adds a kind at run time (a plug-in of your own).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sinkscope.errors import ModelLoadError
from sinkscope.io import write_json_atomic

#: A directory holding this file is a manifest-based sinkscope artefact (e.g. a saved patch).
MANIFEST_NAME = "sinkscope_manifest.json"

#: A loader (``load(directory, **load_model_kwargs) -> (model, tokenizer)``) or a test (``detect(directory) ->
#: bool``), given as the callable or as its import string ``"package.module:function"``.
Hook = Callable[..., Any] | str


def resolve(hook: Hook) -> Callable[..., Any]:
    """The callable an import string names (imported now), or ``hook`` itself when it is callable.

    >>> resolve("json:dumps") is json.dumps
    True
    """
    if callable(hook):
        return hook
    module, _, name = hook.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class ArtefactKind:
    """One kind of saved artefact.

    Attributes:
        name: the kind (the manifest's ``kind`` for manifest-based artefacts).
        load: ``load(directory, **load_model_kwargs) -> (model, tokenizer)``, or its import string.
        detect: ``detect(directory) -> bool`` (or its import string); None: a manifest-based kind, recognised
            by its manifest's ``kind`` without importing anything.
    """

    name: str
    load: Hook
    detect: Hook | None = None

    def recognises(self, directory: Path) -> bool:
        """Whether ``directory`` holds this kind (imports the owner only for a kind with its own test)."""
        if self.detect is None:
            return manifest_kind(directory) == self.name
        return bool(resolve(self.detect)(directory))

    def open(self, directory: Path, **kwargs: Any) -> tuple[Any, Any]:
        """``(model, tokenizer)`` from the kind's loader (imported now)."""
        return resolve(self.load)(directory, **kwargs)


#: The built-in kinds: saved repetition patches and ``sinkscope train`` run directories.
ARTEFACT_KINDS: dict[str, ArtefactKind] = {
    "repeat_patch": ArtefactKind("repeat_patch", "sinkscope.interventions.patch:load_patched_model"),
    "tinygpt_run": ArtefactKind("tinygpt_run", "sinkscope.training.run:load_run_model",
                                detect="sinkscope.training.run:is_run_dir"),
}


def register_artefact(name: str, load: Hook, detect: Hook | None = None) -> ArtefactKind:
    """Add a kind (a plug-in of your own); without ``detect`` it is the manifest-based kind ``name``.

    A built-in kind is in `ARTEFACT_KINDS` already: registering its name again returns it unchanged.

    Raises:
        ValueError: another kind of that name is registered.
    """
    if name in ARTEFACT_KINDS:
        if name in _BUILTIN:
            return ARTEFACT_KINDS[name]
        raise ValueError(f"artefact kind {name!r} is already registered")
    ARTEFACT_KINDS[name] = ArtefactKind(name, load, detect)
    return ARTEFACT_KINDS[name]


_BUILTIN = frozenset(ARTEFACT_KINDS)


def manifest_kind(directory: str | Path) -> str | None:
    """The ``kind`` of the manifest in ``directory`` (None without a readable manifest)."""
    try:
        return read_manifest(directory).get("kind")
    except ModelLoadError:
        return None


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of an artefact directory.

    Raises:
        ModelLoadError: no manifest, not valid JSON, or not a JSON object (one line naming the file).
    """
    p = Path(directory) / MANIFEST_NAME
    if not p.is_file():
        raise ModelLoadError(f"no {MANIFEST_NAME} in {directory}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ModelLoadError(f"broken manifest {p}: not UTF-8 text") from None
    except ValueError as e:
        raise ModelLoadError(f"broken manifest {p}: not valid JSON ({e})") from None
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
    """The kind that recognises ``directory``, if any: manifest-based kinds first (no import), then the kinds
    with a test of their own."""
    d = Path(directory)
    kinds = sorted(ARTEFACT_KINDS.values(), key=lambda k: k.detect is not None)
    return next((k for k in kinds if k.recognises(d)), None)


def open_artefact(directory: str | Path, **kwargs: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the artefact in ``directory`` (``kwargs``: `sinkscope.load_model`'s).

    Raises:
        ModelLoadError: a manifest that is not valid JSON, or whose kind no loader knows.
    """
    d = Path(directory)
    kind = detect_artefact(d)
    if kind is None:
        manifest = read_manifest(d)  # raises for a missing or broken manifest: the message says which
        name = manifest.get("kind")
        raise ModelLoadError(f"{d}: sinkscope artefact kind {name!r} is not registered; known "
                             f"kinds: {', '.join(sorted(ARTEFACT_KINDS))}")
    return kind.open(d, **kwargs)
