"""sinkscope: find, measure, explain and fix attention sinks and extreme tokens in transformer LMs.

The public API is imported lazily (``sinkscope.profile_sinks`` loads transformers on first use), so that
``import sinkscope`` stays cheap for training and DDP worker processes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sinkscope.versions import __version__ as __version__

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
    "qk_alignment": "sinkscope.analyses.qk_alignment:qk_alignment",
    "train": "sinkscope.training:train",
    "load_config": "sinkscope.training:load_config",
    "TinyGPT": "sinkscope.models.tinygpt:TinyGPT",
    "TinyGPTConfig": "sinkscope.models.tinygpt:TinyGPTConfig",
    "sink_cache": "sinkscope.streaming.cache:sink_cache",
    "stream_generate": "sinkscope.streaming.generate:stream_generate",
    "evaluate_stream": "sinkscope.streaming.ppl:evaluate_stream",
    "find_dormant_heads": "sinkscope.analyses.dormant:find_dormant_heads",
    "DormancyReport": "sinkscope.analyses.dormant:DormancyReport",
    "build_report": "sinkscope.report.build:build_report",
    "apply_patch": "sinkscope.interventions.patch:apply_patch",
    "SinkPatch": "sinkscope.interventions.patch:SinkPatch",
    "run_grid": "sinkscope.repetition.grid:run_grid",
    "GridPlan": "sinkscope.repetition.grid:GridPlan",
    "build_patch": "sinkscope.repetition.patch_methods:build_patch",
    "build_direction_patch": "sinkscope.repetition.direction:build_direction_patch",
    "load_trained_tinygpt": "sinkscope.training.run:load_trained",
    "load_tokenizer": "sinkscope.models.load:load_tokenizer",
    "calibrate_kv": "sinkscope.kv.calibrate:calibrate",
    "KVPolicy": "sinkscope.kv.policy:KVPolicy",
    "headwise_cache": "sinkscope.kv.cache:headwise_cache",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # what the lazy exports resolve to, for type checkers and IDEs (never imported at run time)
    from sinkscope.analyses.dormant import DormancyReport as DormancyReport
    from sinkscope.analyses.dormant import find_dormant_heads as find_dormant_heads
    from sinkscope.analyses.qk_alignment import qk_alignment as qk_alignment
    from sinkscope.inputs import TokenBatch as TokenBatch
    from sinkscope.inputs import file_inputs as file_inputs
    from sinkscope.inputs import random_inputs as random_inputs
    from sinkscope.inputs import repeat_inputs as repeat_inputs
    from sinkscope.inputs import text_inputs as text_inputs
    from sinkscope.interventions.patch import SinkPatch as SinkPatch
    from sinkscope.interventions.patch import apply_patch as apply_patch
    from sinkscope.kv.cache import headwise_cache as headwise_cache
    from sinkscope.kv.calibrate import calibrate as calibrate_kv  # noqa: F401 - exported as calibrate_kv
    from sinkscope.kv.policy import KVPolicy as KVPolicy
    from sinkscope.models.adapters import get_adapter as get_adapter
    from sinkscope.models.adapters import supported_architectures as supported_architectures
    from sinkscope.models.load import load_model as load_model
    from sinkscope.models.load import load_tokenizer as load_tokenizer
    from sinkscope.models.tinygpt import TinyGPT as TinyGPT
    from sinkscope.models.tinygpt import TinyGPTConfig as TinyGPTConfig
    from sinkscope.profile import SinkProfile as SinkProfile
    from sinkscope.profile import profile_sinks as profile_sinks
    from sinkscope.repetition.direction import build_direction_patch as build_direction_patch
    from sinkscope.repetition.grid import GridPlan as GridPlan
    from sinkscope.repetition.grid import run_grid as run_grid
    from sinkscope.repetition.patch_methods import build_patch as build_patch
    from sinkscope.report.build import build_report as build_report
    from sinkscope.streaming.cache import sink_cache as sink_cache
    from sinkscope.streaming.generate import stream_generate as stream_generate
    from sinkscope.streaming.ppl import evaluate_stream as evaluate_stream
    from sinkscope.training import load_config as load_config
    from sinkscope.training import train as train
    from sinkscope.training.run import load_trained as load_trained_tinygpt  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sinkscope' has no attribute {name!r}")
    module, attr = _EXPORTS[name].split(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
