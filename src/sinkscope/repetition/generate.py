"""Batched greedy continuations for the repetition analyses (re-exported from the layers below them).

`greedy_continue` lives in `sinkscope.models.generate` and the padding helper in `sinkscope.inputs`, where
interventions and repetition, which both use them, sit above.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sinkscope.inputs import pad_batch
from sinkscope.models.generate import greedy_continue as greedy_continue


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Left-pad id lists: ``ids`` (B, T) and ``attention_mask`` (B, T) (1 = real token); see `pad_batch`."""
    return pad_batch(seqs, pad_id, side="left", device=device)
