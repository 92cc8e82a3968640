"""sinkscope.devices: one parser, one meaning of auto, one-line errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sinkscope.devices import model_device, parse_device, parse_dtype, placement_kwargs, single_device
from sinkscope.errors import InputError


@pytest.mark.parametrize("bad", ["tpu", "", "cuda:x", "gpu0"])
def test_unknown_devices_are_one_line_errors(bad: str) -> None:
    with pytest.raises(InputError) as e:
        parse_device(bad)
    assert "\n" not in str(e.value) and "use cpu, cuda, cuda:N, mps or auto" in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda_names_the_problem() -> None:
    with pytest.raises(InputError, match="no CUDA device is available here"):
        parse_device("cuda")
    assert single_device("auto") == torch.device("cpu")
    assert placement_kwargs("auto") == {"device": "cpu"}


def test_dtypes_and_auto() -> None:
    assert parse_dtype("float32") is torch.float32 and parse_dtype("BF16") is torch.bfloat16
    assert parse_dtype(torch.float16) is torch.float16 and parse_dtype("auto") == "auto"
    with pytest.raises(InputError, match="choose one of"):
        parse_dtype("int8")


def test_model_device_of_a_model_without_parameters_is_the_cpu() -> None:
    assert model_device(nn.ReLU()) == torch.device("cpu")
    m = nn.Linear(2, 2).to(torch.float64)
    assert model_device(m) == torch.device("cpu")
