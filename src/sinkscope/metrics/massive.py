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
        B, T, D = x.shape
        rows = self.rows if self.rows is not None else np.arange(B)
        absx = x.abs() * valid[:, :, None]
        vals, flat = absx.reshape(-1).topk(min(self.top, absx.numel()))
        entries = self.best.setdefault(layer, [])
        for v, f in zip(vals.tolist(), flat.tolist()):
            b, rem = divmod(f, T * D)
            t, d = divmod(rem, D)
            entries.append((v, int(rows[b]), t, d))
        entries.sort(key=lambda e: -e[0])
        del entries[self.top:]
        med = self.medians.setdefault(layer, [])
        for b in range(B):
            n = int(valid[b].sum())
            if n:
                med.append(float(torch.median(absx[b, :n].reshape(-1))))

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
