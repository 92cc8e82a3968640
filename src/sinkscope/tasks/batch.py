"""The batch a training task hands to the loop: inputs, targets, loss mask and named query classes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class LMBatch:
    """One batch of next-token prediction.

    Attributes:
        idx: input ids ``(B, T)``.
        targets: next-token ids ``(B, T)``.
        loss_mask: positions that carry the loss ``(B, T)`` bool.
        classes: query classes for per-head active/dormant labels, name -> ``(B, T)`` bool (e.g. BB
            ``trigger`` / ``non_trigger``; text ``text`` / ``random``).
        parts: named subsets of the loss positions logged separately (e.g. BB ``copy`` / ``bigram``).
        oracle_nll: the true model's negative log-likelihood of each target ``(B, T)`` (nats), when known.
        prefix_len: prefix-LM length passed to the model (0: plain causal LM).
    """

    idx: Tensor
    targets: Tensor
    loss_mask: Tensor
    classes: dict[str, Tensor] = field(default_factory=dict)
    parts: dict[str, Tensor] = field(default_factory=dict)
    oracle_nll: Tensor | None = None
    prefix_len: int = 0

    def rows(self, start: int, stop: int) -> LMBatch:
        """The sub-batch of rows ``start:stop`` (a DDP rank's share of the global batch)."""
        return LMBatch(
            self.idx[start:stop], self.targets[start:stop], self.loss_mask[start:stop],
            {k: v[start:stop] for k, v in self.classes.items()}, {k: v[start:stop] for k, v in self.parts.items()},
            None if self.oracle_nll is None else self.oracle_nll[start:stop], self.prefix_len,
        )

    def to(self, device: torch.device | str) -> LMBatch:
        mv = lambda t: t.to(device)  # noqa: E731
        return LMBatch(mv(self.idx), mv(self.targets), mv(self.loss_mask), {k: mv(v) for k, v in self.classes.items()},
                       {k: mv(v) for k, v in self.parts.items()},
                       None if self.oracle_nll is None else mv(self.oracle_nll), self.prefix_len)


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, stream): batches are a pure function of the step,
    so a resumed run and every DDP rank see exactly the same global batch."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 7919 + stream * 104_729) % (2**63 - 1))
    return g
