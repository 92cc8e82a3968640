"""What every model-loading CLI command shares: --model, --device, --dtype, --revision, --trust-remote-code.

`load_cli_model` checks the spec and the options before torch or transformers are imported, so a typo is refused
at once, then loads through `sinkscope.load_model`. ``--device auto`` places a model across the available devices
with accelerate's ``device_map="auto"`` (the profiler keeps each statistic on its layer's device).
"""

from __future__ import annotations

from typing import Any

import typer

from sinkscope.errors import InputError
from sinkscope.models.load import DEFAULT_MODEL, resolve_model_spec

DTYPES = ("float32", "bfloat16", "float16", "auto")

MODEL_OPTION = typer.Option(DEFAULT_MODEL, "--model", "-m",
                            help="alias, HF directory, .gguf file, saved patch directory or hub id")
DEVICE_OPTION = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N, mps, or auto (the accelerators this machine "
                                                     "has, spread with device_map='auto', else the CPU)")
DTYPE_OPTION = typer.Option("float32", "--dtype", help="float32 (default: exact metrics), bfloat16, float16 or "
                                                       "auto (the checkpoint's dtype)")
REVISION_OPTION = typer.Option(None, "--revision", help="hub models: branch, tag or commit (the resolved commit "
                                                        "is recorded in the results)")
TRUST_OPTION = typer.Option(False, "--trust-remote-code", help="run the model repository's own code: only for "
                                                               "code you trust")


def check_device(device: str) -> str:
    """Validate ``--device`` (`sinkscope.devices.parse_device`, which names the flag); returns it normalised."""
    from sinkscope.devices import parse_device  # imports torch: only once the cheap checks passed

    return parse_device(device, param="--device")


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return dtype


def load_cli_model(model: str, *, device: str = "cpu", dtype: str = "float32", revision: str | None = None,
                   trust_remote_code: bool = False, verbose: bool = False) -> tuple[Any, Any]:
    """Check the options (cheap, before heavy imports), then ``sinkscope.load_model`` with them.

    Returns ``(model, tokenizer)``.
    """
    source = resolve_model_spec(model)
    check_dtype(dtype)
    if revision is not None and source.kind not in ("hub", "manifest"):
        raise InputError(f"--revision applies to hub models; {model!r} is a local {source.kind}")
    check_device(device)
    from sinkscope.plugins import load_model  # the loader that also opens saved patches and training runs

    from sinkscope.devices import placement_kwargs

    placement = placement_kwargs(device)
    extra: dict[str, Any] = {"revision": revision} if revision is not None else {}
    return load_model(model, dtype=dtype, trust_remote_code=trust_remote_code, verbose=verbose, **placement, **extra)
