"""The profile on each available device and dtype against CPU fp32: the worst differences, per statistic.

    PYTHONPATH=src python bench/device_parity.py [--out bench/results/device_parity.json]

The tests (`tests/unit/profile/test_profile_devices.py`) hold these to 1e-5 (fp32) and to 0.01 absolute on alpha,
2% relative on the norms (bf16); this prints how close each device actually comes, over the tiny architectures
of `sinkscope.models.random_hf` (3 sequences of 7-12 tokens, batch 2, TF32 off). On a CUDA machine it adds CUDA fp32,
CUDA bf16, a model whose odd layers are offloaded to the CPU (accelerate's default for CPU entries of a
device map: weights in CPU memory, executed on the GPU) and one split over cuda:0 and the CPU (odd layers executed
on the CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from sinkscope.models.placement import alternating_device_map
from sinkscope.models.random_hf import TINY_ARCHITECTURES, tiny_model
from sinkscope.profile import profile_sinks

FIELDS = ("alpha", "value_norm", "residual_norm", "cos_first", "cos_other", "out_norm", "sink_mass", "gate_mean")


def _sequences() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 99, (n,), generator=g).tolist() for n in (12, 7, 10)]


def _device_map(model) -> dict[str, int | str]:
    """Even decoder layers (and everything outside the layers) on cuda:0, odd layers on the CPU."""
    return alternating_device_map(model, 0, "cpu")


def _split_cuda_cpu(model):
    """Odd layers executed on the CPU (``main_device="cpu"``), the rest on cuda:0."""
    from accelerate import dispatch_model

    return dispatch_model(model, device_map=_device_map(model), main_device="cpu")


def _offload_to_cpu(model):
    """accelerate's default for CPU-mapped layers: weights kept in CPU memory, executed on cuda:0."""
    from accelerate import dispatch_model

    return dispatch_model(model, device_map=_device_map(model))


def _worst(got: np.ndarray, ref: np.ndarray, relative: bool) -> float:
    g, r = np.nan_to_num(got.astype(float)), np.nan_to_num(ref.astype(float))
    d = np.abs(g - r)
    if relative:
        d = d / np.maximum(np.abs(r), 1e-12)
    return float(d.max(initial=0.0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    setups: list[tuple[str, object]] = [("cpu bf16", lambda m: m.to("cpu", torch.bfloat16))]
    if torch.cuda.is_available():
        setups = [("cuda fp32", lambda m: m.to("cuda")), ("cuda bf16", lambda m: m.to("cuda", torch.bfloat16)),
                  ("cuda:0 + cpu offload fp32", _offload_to_cpu), ("cuda:0 + cpu split fp32", _split_cuda_cpu),
                  *setups]
    rows = []
    for name, place in setups:
        worst: dict[str, float] = {}
        for arch in TINY_ARCHITECTURES:
            ref = profile_sinks(tiny_model(arch), _sequences(), batch_size=2)
            got = profile_sinks(place(tiny_model(arch)), _sequences(), batch_size=2)
            for f in FIELDS:
                r, g = getattr(ref, f), getattr(got, f)
                if r is None:
                    continue
                w = _worst(g, r, relative=f in ("value_norm", "residual_norm", "out_norm"))
                worst[f] = max(worst.get(f, 0.0), w)
        rows.append({"setup": name, "architectures": len(TINY_ARCHITECTURES), **worst})
        print(f"{name:>24}: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()), flush=True)
    info = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "note": "worst |difference| to CPU fp32 over the tiny architectures; norms relative", "rows": rows}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
