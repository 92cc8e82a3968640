"""Massive activations (Sun et al. 2402.17762): the few residual-stream entries far above the median magnitude."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

#: Sun et al.'s criterion: |x| above this and ~1000x the median magnitude.
MASSIVE_ABS = 100.0
MASSIVE_RATIO = 1000.0


class MassiveTracker:
    """Keeps, per layer, the ``top`` largest |hidden| entries seen over all batches and per-sample medians.

    ``update(layer, x, valid, rows)``: x (B, T, D) residual stream after the layer, valid (B, T) bool,
    rows (B,) the sample index of each batch row.
    """

    def __init__(self, top: int = 5) -> None:
        self.top = top
        self.best: dict[int, list[tuple[float, int, int, int]]] = {}  # (|value|, sample, position, dim)
        self.medians: dict[int, list[float]] = {}
        self.rows: np.ndarray | None = None

    def update(self, layer: int, x: Tensor, valid: Tensor) -> None:
        """Fold one batch in: x ``(B, T, D)`` right-padded, valid ``(B, T)`` bool on x's device.

        The top entries are found in two stages (each position's largest |x|, then all entries of the positions
        whose maximum reaches the ``top``-th largest position maximum: the overall top ``top`` entries lie
        there), which equals one ``topk`` over every entry and costs a fraction of it.
        """
        B, T, D = x.shape
        rows = self.rows if self.rows is not None else np.arange(B)
        absx = x.detach().abs()  # (B, T, D)
        n_valid = int(valid.sum())
        entries = self.best.setdefault(layer, [])
        if n_valid:
            row_max = absx.amax(-1).masked_fill(~valid, -1.0)  # (B, T); padding is never a candidate
            thr = row_max.reshape(-1).topk(min(self.top, n_valid)).values[-1]
            bt = ((row_max >= thr) & valid).nonzero()  # (C, 2): the candidate positions (b, t)
            cand = absx[bt[:, 0], bt[:, 1]]  # (C, D)
            vals, flat = cand.reshape(-1).topk(min(self.top, cand.numel()))
            for v, f in zip(vals.tolist(), flat.tolist()):
                c, d = divmod(f, D)
                entries.append((v, int(rows[int(bt[c, 0])]), int(bt[c, 1]), d))
            entries.sort(key=lambda e: -e[0])
            del entries[self.top:]
        med = self.medians.setdefault(layer, [])
        for b in range(B):
            n = int(valid[b].sum())
            if n:
                med.append(lower_median(absx[b, :n].reshape(-1)))

    def summary(self, sample_ids: Any = None) -> list[dict[str, Any]]:
        """Per layer: median |x|, the top entries with their ratio to it, and the dims they sit in."""
        out = []
        for layer in sorted(self.best):
            median = float(np.median(self.medians[layer])) if self.medians[layer] else float("nan")
            top = [{"value": v, "sample": s, "position": t, "dim": d, "ratio_to_median": v / max(median, 1e-30)}
                   for v, s, t, d in self.best[layer]]
            out.append({
                "layer": layer, "median_abs": median, "top": top,
                "dims": sorted({e["dim"] for e in top}),
                "massive": bool(top and top[0]["value"] > MASSIVE_ABS and top[0]["ratio_to_median"] > MASSIVE_RATIO),
            })
        return out


def lower_median(values: Tensor) -> float:
    """The median of a 1-D tensor by torch's convention (the lower of the two middle values for an even count).

    On the CPU numpy's selection (O(n)) finds it ~8x faster than ``torch.median`` at a million entries; elsewhere
    ``torch.median`` runs on the tensor's device.
    """
    if values.device.type != "cpu":
        return float(torch.median(values))
    arr = values.float().numpy() if values.dtype != torch.float64 else values.numpy()
    k = (arr.size - 1) // 2
    return float(np.partition(arr, k)[k])
