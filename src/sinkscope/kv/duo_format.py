"""DuoAttention's head-pattern format: ``full_attention_heads.tsv`` plus ``config.json``, written and read here.

The format (DuoAttention, mit-han-lab/duo-attention, ``duo_attn.utils.load_attn_pattern``; kvpress's
``DuoAttentionPress.load_attention_pattern`` reads the same two files):

* ``full_attention_heads.tsv``: one line per decoder layer, one tab-separated float per **kv head**: the learned
  gate of that head in [0, 1] (readers clip to [0, 1]). Higher = more "retrieval" (full cache).
* ``config.json``: at least ``sink_size`` and ``recent_size`` (the streaming heads' kept tokens).

How the readers turn gates into heads:

* DuoAttention: ``sparsify_attention_heads(gates, threshold=t)`` keeps the full cache where ``gate >= t``; with
  ``sparsity=s`` the threshold is the ``s``-quantile of the gates (ties broken by ~1e-6 noise).
* kvpress: ``DuoAttentionPress(head_compression_ratio=r)`` makes the ``round(r * n_heads)`` kv heads with the
  lowest gates streaming heads (``np.argsort`` of the flattened gates).

sinkscope writes gates that make all three agree with the policy: full-cache heads get gates in (0.5, 1], ranked
among themselves by their distant mass; streaming heads get gates in [0, 0.5), ranked the same way. So
``threshold=0.5``, ``sparsity = streaming share`` and ``head_compression_ratio = streaming share`` all give back
exactly the policy's full heads; ``config.json`` records all three next to ``sink_size`` (= ``n_sink``) and
``recent_size`` (= ``window``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sinkscope.errors import InputError
from sinkscope.io import write_atomic, write_json_atomic

PATTERN_FILE = "full_attention_heads.tsv"
CONFIG_FILE = "config.json"
#: the gate that separates full-cache heads (above) from streaming heads (below)
THRESHOLD = 0.5


def gates_for(full: np.ndarray, scores: np.ndarray | None = None) -> np.ndarray:
    """Gate values (L, Hkv) in [0, 1]: full-cache heads above `THRESHOLD`, streaming heads below.

    Args:
        full: (L, Hkv) bool, the full-cache heads.
        scores: (L, Hkv) ranking scores (higher = more retrieval); None: every head of a group gets the same gate
            (1.0 for full, 0.0 for streaming).
    """
    full = np.asarray(full, dtype=bool)
    gates = np.where(full, 1.0, 0.0)
    if scores is None:
        return gates
    scores = np.asarray(scores, dtype=float)
    for group, lo in ((full, THRESHOLD), (~full, 0.0)):
        idx = np.flatnonzero(group.ravel())
        if idx.size == 0:
            continue
        order = idx[np.lexsort((idx, scores.ravel()[idx]))]  # ascending score, ties by position
        ranks = (np.arange(idx.size) + 1.0) / (idx.size + 1.0)  # strictly inside (0, 1)
        gates.ravel()[order] = lo + 0.5 * ranks
    return gates


def write_pattern(directory: str | Path, full: np.ndarray, *, n_sink: int, window: int,
                  scores: np.ndarray | None = None, extra: dict[str, Any] | None = None) -> None:
    """Write ``full_attention_heads.tsv`` and ``config.json`` (atomically) into ``directory``."""
    full = np.asarray(full, dtype=bool)
    gates = gates_for(full, scores)
    lines = ["\t".join(f"{g:.6f}" for g in row) for row in gates]
    write_atomic(Path(directory) / PATTERN_FILE, "\n".join(lines) + "\n")
    streaming = float(1.0 - full.mean()) if full.size else 0.0
    config = {"sink_size": int(n_sink), "recent_size": int(window), "threshold": THRESHOLD,
              "sparsity": streaming, "head_compression_ratio": streaming, "written_by": "sinkscope", **(extra or {})}
    write_json_atomic(Path(directory) / CONFIG_FILE, config)


def read_gates(directory: str | Path) -> tuple[np.ndarray, int, int]:
    """``(gates (L, Hkv) clipped to [0, 1], sink_size, recent_size)`` from a DuoAttention pattern directory, as
    DuoAttention's own loader reads them; one-line `InputError` on a missing or garbled file."""
    d = Path(directory)
    tsv, cfg = d / PATTERN_FILE, d / CONFIG_FILE
    for p in (tsv, cfg):
        if not p.is_file():
            raise InputError(f"DuoAttention pattern file missing: {p}")
    try:
        rows = [line.split("\t") for line in tsv.read_text(encoding="utf-8").splitlines() if line.strip()]
        gates = np.array([[float(x) for x in row] for row in rows], dtype=float)
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{tsv} is not a tab-separated table of numbers ({e})") from None
    if gates.ndim != 2 or gates.size == 0:
        raise InputError(f"{tsv} must hold one line of per-kv-head gates per layer, all lines equally long")
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
        sink, recent = int(config["sink_size"]), int(config["recent_size"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise InputError(f"{cfg} is not a DuoAttention config with sink_size and recent_size ({e!r})") from None
    return np.clip(gates, 0.0, 1.0), sink, recent


def full_heads_by_threshold(gates: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """DuoAttention's rule: a kv head keeps the full cache where its gate is ``>= threshold``. (L, Hkv) bool."""
    return np.asarray(gates) >= threshold


def full_heads_by_compression(gates: np.ndarray, head_compression_ratio: float) -> np.ndarray:
    """kvpress's rule (``DuoAttentionPress``): the ``round(ratio * n)`` lowest gates become streaming heads."""
    gates = np.asarray(gates)
    n_pruned = round(gates.size * head_compression_ratio)
    streaming = np.zeros(gates.shape, dtype=bool)
    if n_pruned > 0:
        streaming[np.unravel_index(np.argsort(gates, axis=None)[:n_pruned], gates.shape)] = True
    return ~streaming


def heads_per_layer(full: np.ndarray) -> tuple[tuple[int, ...], ...]:
    """(L, Hkv) bool -> per layer, the indices of its full-cache kv heads."""
    return tuple(tuple(int(h) for h in np.flatnonzero(row)) for row in np.asarray(full, dtype=bool))


def full_matrix(full_heads: Sequence[Sequence[int]], n_kv_heads: int) -> np.ndarray:
    """Per-layer head lists -> (L, Hkv) bool."""
    m = np.zeros((len(full_heads), n_kv_heads), dtype=bool)
    for layer, heads in enumerate(full_heads):
        m[layer, list(heads)] = True
    return m
