"""Shared fixtures: deterministic seeds, tiny random models of every supported architecture, the real SmolLM2."""

from __future__ import annotations

import os

import pytest
import torch

from sinkscope.models.tiny import TINY_ARCHITECTURES, tiny_model


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=TINY_ARCHITECTURES)
def tiny(request: pytest.FixtureRequest):
    """(model_type, model): a tiny random-initialised model, fp32, eval mode."""
    return request.param, tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (model, tokenizer), loaded once per session."""
    from sinkscope.models.load import load_model

    return load_model("smollm2-135m")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available() or os.environ.get("SINKSCOPE_GPU"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
