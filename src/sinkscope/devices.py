"""Devices and dtypes: the one parser of ``device`` / ``dtype`` strings, one meaning of ``auto``, one `model_device`.

``device``: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto``. **``auto`` means "the accelerators this machine
has, else the CPU"** everywhere: loading a model it places the model with accelerate's ``device_map="auto"``
when CUDA is available (spread over every GPU; one GPU gets the whole model) and on the CPU otherwise; for
one-device work (training, a single forward) it is ``cuda`` when available, else the CPU.

``dtype``: ``float32`` (also ``fp32``), ``bfloat16`` (``bf16``), ``float16`` (``fp16``, ``half``) or ``auto``.
**``auto`` means "the checkpoint's own dtype"** everywhere; a model made from scratch (training, a random
tiny model) has no checkpoint, so there ``auto`` is float32. sinkscope's default is float32 (its metrics are
checked against eager attention to 1e-5).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sinkscope.errors import InputError

DEVICE_CHOICES = "cpu, cuda, cuda:N, mps or auto"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_device(device: str | torch.device, *, param: str = "device") -> str:
    """Check a device string against this machine; returns it normalised (``"auto"`` kept as it is).

    >>> parse_device("cpu"), parse_device("auto")
    ('cpu', 'auto')
    >>> parse_device("tpu")
    Traceback (most recent call last):
    ...
    sinkscope.errors.InputError: device 'tpu' is not a device; use cpu, cuda, cuda:N, mps or auto

    Raises:
        InputError: not a device string, or a device this machine does not have.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str) or not device.strip():
        raise InputError(f"{param} {device!r} is not a device; use {DEVICE_CHOICES}", param=param)
    device = device.strip()
    if device == "auto":
        return device
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"{param} {device!r} is not a device; use {DEVICE_CHOICES}", param=param) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{param} {device}: no CUDA device is available here", param=param)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"{param} {device}: only {torch.cuda.device_count()} CUDA device(s) here", param=param)
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise InputError(f"{param} {device}: MPS is not available here", param=param)
    elif dev.type != "cpu":
        raise InputError(f"{param} {device!r}: unsupported device type {dev.type!r}; use {DEVICE_CHOICES}",
                         param=param)
    return str(dev)


def single_device(device: str | torch.device) -> torch.device:
    """One device for one-device work: ``auto`` is ``cuda`` when available, else the CPU.

    >>> single_device("cpu")
    device(type='cpu')
    """
    device = parse_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def placement_kwargs(device: str | torch.device) -> dict[str, Any]:
    """``from_pretrained`` placement for a device string: ``{"device_map": "auto"}`` for ``auto`` on a machine
    with CUDA, else ``{"device": ...}`` (``auto`` without CUDA is the CPU).

    >>> placement_kwargs("cpu")
    {'device': 'cpu'}
    """
    device = parse_device(device)
    if device == "auto":
        return {"device_map": "auto"} if torch.cuda.is_available() else {"device": "cpu"}
    return {"device": device}


def parse_dtype(dtype: str | torch.dtype | None, *, param: str = "dtype") -> torch.dtype | str:
    """A dtype name or ``torch.dtype`` -> the ``torch.dtype``; ``"auto"`` (the checkpoint's dtype) is returned as
    ``"auto"``; None is float32.

    >>> parse_dtype("bf16"), parse_dtype("auto"), parse_dtype(None)
    (torch.bfloat16, 'auto', torch.float32)

    Raises:
        InputError: an unknown name.
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise InputError(f"{param} {dtype}: use float32, bfloat16 or float16", param=param)
        return dtype
    if dtype == "auto":
        return "auto"
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name in DTYPES:
            return DTYPES[name]
    raise InputError(f"{param} {dtype!r}: choose one of float32, bfloat16, float16 or auto", param=param)


def model_device(model: nn.Module) -> torch.device:
    """Where ``model`` takes its inputs: the device of its first parameter (its embedding, also under a
    ``device_map`` that spreads layers over several devices), or of its first buffer; the CPU for a model
    with neither.

    >>> model_device(nn.Linear(2, 2))
    device(type='cpu')
    """
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")
