"""The massive-activation tracker's fast paths equal the plain computations they replace."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkscope.metrics.massive import MassiveTracker, lower_median


@pytest.mark.parametrize("n", [1, 2, 7, 10, 1001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_lower_median_is_torch_median(n: int, dtype: torch.dtype) -> None:
    v = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype).abs()
    assert lower_median(v) == float(torch.median(v))


def _plain_top(x: torch.Tensor, valid: torch.Tensor, top: int) -> list[tuple[float, int, int, int]]:
    """One topk over every (padding-zeroed) entry: the reference."""
    B, T, D = x.shape
    absx = x.abs() * valid[:, :, None]
    vals, flat = absx.reshape(-1).topk(top)
    out = []
    for v, f in zip(vals.tolist(), flat.tolist()):
        b, rem = divmod(f, T * D)
        t, d = divmod(rem, D)
        out.append((v, b, t, d))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_two_stage_top_entries_equal_one_topk(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    B, T, D = 3, 11, 16
    x = torch.randn(B, T, D, generator=g)
    x[0, 3, 5] = 50.0  # several large entries in one position, and in padding (must be ignored)
    x[0, 3, 7] = -40.0
    x[2, 10, 1] = 999.0
    lengths = [11, 6, 9]
    valid = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    tr = MassiveTracker(top=5)
    tr.update(0, x, valid)
    assert tr.best[0] == _plain_top(x, valid, 5)
    assert tr.best[0][0][:4] == (50.0, 0, 3, 5) and tr.best[0][1][:4] == (40.0, 0, 3, 7)
    med = [float(torch.median((x[b, :n].abs()).reshape(-1))) for b, n in enumerate(lengths)]
    assert tr.medians[0] == med


def test_fewer_real_positions_than_top() -> None:
    x = torch.tensor([[[1.0, -3.0, 2.0]]])  # one position, three entries, top 5
    tr = MassiveTracker(top=5)
    tr.update(2, x, torch.ones(1, 1, dtype=torch.bool))
    assert [e[0] for e in tr.best[2]] == [3.0, 2.0, 1.0] and np.isclose(tr.medians[2][0], 2.0)
