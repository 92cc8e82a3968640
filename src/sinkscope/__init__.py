"""sinkscope: find, measure, explain and fix attention sinks and extreme tokens in transformer LMs.

The public API is imported lazily (``sinkscope.profile_sinks`` loads transformers on first use), so that
``import sinkscope`` stays cheap for training and DDP worker processes.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> "module:attribute"
_EXPORTS: dict[str, str] = {
    "load_model": "sinkscope.models.load:load_model",
    "get_adapter": "sinkscope.models.adapters:get_adapter",
    "supported_architectures": "sinkscope.models.adapters:supported_architectures",
    "TokenBatch": "sinkscope.inputs:TokenBatch",
    "text_inputs": "sinkscope.inputs:text_inputs",
    "file_inputs": "sinkscope.inputs:file_inputs",
    "random_inputs": "sinkscope.inputs:random_inputs",
    "repeat_inputs": "sinkscope.inputs:repeat_inputs",
    "profile_sinks": "sinkscope.profile:profile_sinks",
    "SinkProfile": "sinkscope.profile:SinkProfile",
    "qk_alignment": "sinkscope.metrics.qk_alignment:qk_alignment",
    "train": "sinkscope.training:train",
    "load_config": "sinkscope.training:load_config",
    "TinyGPT": "sinkscope.models.tinygpt:TinyGPT",
    "TinyGPTConfig": "sinkscope.models.tinygpt:TinyGPTConfig",
    "sink_cache": "sinkscope.streaming.cache:sink_cache",
    "stream_generate": "sinkscope.streaming.generate:stream_generate",
    "evaluate_stream": "sinkscope.streaming.ppl:evaluate_stream",
    "find_dormant_heads": "sinkscope.metrics.dormant:find_dormant_heads",
    "DormancyReport": "sinkscope.metrics.dormant:DormancyReport",
    "build_report": "sinkscope.report.build:build_report",
    "apply_patch": "sinkscope.interventions.patch:apply_patch",
    "SinkPatch": "sinkscope.interventions.patch:SinkPatch",
    "scan_repetition": "sinkscope.repetition.scan:scan_repetition",
    "build_direction_patch": "sinkscope.repetition.direction:build_direction_patch",
    "load_trained_tinygpt": "sinkscope.models.tinygpt_adapter:load_trained",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sinkscope' has no attribute {name!r}")
    module, attr = _EXPORTS[name].split(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
