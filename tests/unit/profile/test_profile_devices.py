"""The profile on every available device and dtype, and on a model split over two devices, against CPU fp32.

CPU fp32 itself equals eager ``output_attentions`` to 1e-5 (`tests/unit/metrics/test_profile_parity.py`), so
these tests chain to that reference. fp32 on another device is held to the same 1e-5 (TF32 off); bf16 weights
and activations carry ~3 significant digits, so bf16 is held to the stated tolerances below. Tests that need a
CUDA device are marked ``gpu`` (skipped without one).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkscope.models.placement import alternating_device_map
from sinkscope.models.random_hf import TINY_ARCHITECTURES, tiny_model
from sinkscope.profile import SinkProfile, profile_sinks

FP32_TOL = 1e-5
#: bf16 tolerances: alpha (attention mass, in [0, 1]) absolute; norms relative to the fp32 value.
BF16_ALPHA_TOL = 0.01  # measured worst on CPU over the 11 tiny architectures: 0.0021
BF16_NORM_RTOL = 0.02  # measured worst on CPU: 0.4%

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
FIELDS = ("alpha", "value_norm", "residual_norm", "cos_first", "cos_other", "out_norm", "sink_mass", "gate_mean")


def _sequences() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 99, (n,), generator=g).tolist() for n in (12, 7, 10)]


def _reference(arch: str) -> SinkProfile:
    return profile_sinks(tiny_model(arch), _sequences(), batch_size=2)


def _close(got: np.ndarray, ref: np.ndarray, atol: float, rtol: float = 0.0) -> tuple[bool, float]:
    assert np.array_equal(np.isnan(got), np.isnan(ref)), "padding (NaN) pattern differs"
    g, r = np.nan_to_num(got.astype(float)), np.nan_to_num(ref.astype(float))
    return bool(np.all(np.abs(g - r) <= atol + rtol * np.abs(r))), float(np.abs(g - r).max(initial=0.0))


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_fp32_on_each_device_equals_cpu(arch: str, device: str) -> None:
    ref = _reference(arch)
    got = profile_sinks(tiny_model(arch).to(device), _sequences(), batch_size=2)
    for name in FIELDS:
        r, g = getattr(ref, name), getattr(got, name)
        assert (r is None) == (g is None), name
        if r is not None:
            ok, worst = _close(g, r, FP32_TOL, FP32_TOL)
            assert ok, (arch, device, name, worst)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_bf16_on_each_device_within_the_stated_tolerance(arch: str, device: str) -> None:
    """Statistics accumulate in fp32/fp64 whatever the model dtype: a bf16 model gives the fp32 numbers to
    bf16 precision, finite everywhere the fp32 ones are."""
    ref = _reference(arch)
    got = profile_sinks(tiny_model(arch).to(device, torch.bfloat16), _sequences(), batch_size=2)
    ok, worst = _close(got.alpha, ref.alpha, BF16_ALPHA_TOL)
    assert ok, (arch, device, "alpha", worst)
    for name in ("residual_norm", "value_norm"):
        ok, worst = _close(getattr(got, name), getattr(ref, name), 0.0, BF16_NORM_RTOL)
        assert ok, (arch, device, name, worst)


def _device_map(model) -> dict[str, int | str]:
    """Even decoder layers (and everything outside the layers) on cuda:0, odd layers on the CPU."""
    return alternating_device_map(model, 0, "cpu")


def _split_cuda_cpu(model):
    """The odd layers run on the CPU, the rest on cuda:0 (``main_device="cpu"``: accelerate keeps CPU-mapped
    weights on the CPU and executes them there instead of offloading them)."""
    from accelerate import dispatch_model

    return dispatch_model(model, device_map=_device_map(model), main_device="cpu")


def _offload_to_cpu(model):
    """What ``device_map="auto"`` does when the GPU is too small: CPU-mapped layers keep their weights in CPU
    memory (``meta`` on the module) and are executed on cuda:0, the weights copied in for each call."""
    from accelerate import dispatch_model

    return dispatch_model(model, device_map=_device_map(model))


def _assert_equals_cpu(ref: SinkProfile, got: SinkProfile, arch: str) -> None:
    for name in FIELDS:
        r, g = getattr(ref, name), getattr(got, name)
        if r is not None:
            ok, worst = _close(g, r, FP32_TOL, FP32_TOL)
            assert ok, (arch, name, worst)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_model_split_over_cuda_and_cpu_equals_cpu(arch: str) -> None:
    """``device_map``-style placement over two devices: each statistic is computed on its layer's device,
    nothing mixes."""
    ref = _reference(arch)
    model = _split_cuda_cpu(tiny_model(arch))
    assert {p.device.type for p in model.parameters()} == {"cuda", "cpu"}
    _assert_equals_cpu(ref, profile_sinks(model, _sequences(), batch_size=2), arch)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_model_offloaded_to_cpu_equals_cpu(arch: str) -> None:
    ref = _reference(arch)
    model = _offload_to_cpu(tiny_model(arch))
    assert {p.device.type for p in model.parameters()} == {"cuda", "meta"}
    _assert_equals_cpu(ref, profile_sinks(model, _sequences(), batch_size=2), arch)
