"""Collectors: how each model family is measured by the one profiling loop (see `sinkscope.collectors.base`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from sinkscope.collectors.base import Collector
from sinkscope.collectors.hf import HFCollector
from sinkscope.collectors.tinygpt import TinyGPTCollector

#: Model families, most specific first; the Hugging Face collector takes every other model (and raises
#: `UnsupportedArchitectureError` for an architecture without an adapter).
COLLECTORS: list[type[Collector]] = [TinyGPTCollector, HFCollector]


def collector_for(model: nn.Module, **options: Any) -> Collector:
    """The collector of ``model``'s family, built with ``options`` (``fused``, ``chunk_bytes``, ``adapter``,
    ``prefix_len``: each family takes the ones that apply to it and refuses the others)."""
    cls = next(c for c in COLLECTORS if c.accepts(model))
    return cls(model, **options)
