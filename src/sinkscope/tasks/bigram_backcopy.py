"""The Bigram-Backcopy task (Guo et al. 2410.13835, RESEARCH.md §5): bigram text whose trigger tokens copy back.

Vocabulary: the ``n_chars`` most frequent characters of a corpus (65, like Tiny Shakespeare; for WikiText
files, after :func:`clean_wikitext`) plus BOS (id
``n_chars``). The transition matrix is the corpus's empirical character bigram distribution restricted to those
characters. The ``n_triggers`` most frequent characters are triggers. A sequence is BOS, a first character
drawn from the marginal distribution without the triggers, then bigram steps, except that right after a
trigger the next token copies the token before the trigger (``x[t+1] = x[t-1]``). Two triggers never follow
each other and BOS is never copied. Sequences are generated online from a generator seeded by the step.
Without BOS (``bos=False``; Gu et al. train without one) the sequence starts directly with the first character
at position 0; the vocabulary keeps the (then unused) BOS id.

The loss is next-token cross-entropy on every position; ``copy`` (after a trigger) and ``bigram`` (the rest)
are logged separately, and the oracle's NLL (bigram entropy; 0 on copies) gives the excess risk.

>>> task = BigramBackcopy.from_text("the cat sat on the mat. " * 50, n_chars=10, n_triggers=2)
>>> b = task.batch(seed=0, step=0, batch_size=4, seq_len=16)
>>> b.idx.shape, bool((b.idx[:, 0] == task.bos_id).all())
(torch.Size([4, 16]), True)
>>> trig = task.is_trigger[b.idx[:, 1:-1]]
>>> bool((b.idx[:, 2:][trig] == b.idx[:, :-2][trig]).all())  # after a trigger, copy the token before it
True
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor

from sinkscope.errors import InputError
from sinkscope.io import read_text_file
from sinkscope.tasks.batch import LMBatch, step_generator


def clean_wikitext(text: str) -> str:
    """Drop WikiText markup (``<unk>``, `` @-@ ``, heading ``=``) so it cannot form copy loops such as ``> > >``."""
    text = re.sub(r" @(.)@ ", r"\1", text).replace("<unk>", "")
    return re.sub(r"^ *=+ .* =+ *$", "", text, flags=re.M)


class BigramBackcopy:
    """Bigram-Backcopy sequence generator.

    Attributes:
        chars: the alphabet, most frequent first (``chars[i]`` has id ``i``); BOS is id ``len(chars)``.
        transition: ``(n_chars, n_chars)`` row-stochastic bigram matrix.
        first_dist: ``(n_chars,)`` marginal without triggers (distribution of the first character).
        is_trigger: ``(n_chars + 1,)`` bool, True for the trigger ids (BOS is not a trigger).
    """

    def __init__(self, chars: list[str], transition: Tensor, first_dist: Tensor, n_triggers: int, *,
                 bos: bool = True) -> None:
        self.chars = chars
        self.bos = bos
        self.transition = transition
        self.first_dist = first_dist
        self.n_triggers = n_triggers
        self.bos_id = len(chars)
        self.vocab_size = len(chars) + 1
        self.is_trigger = torch.zeros(self.vocab_size, dtype=torch.bool)
        self.is_trigger[:n_triggers] = True
        self._cdf = torch.cumsum(transition.double(), -1)
        self._cdf[:, -1] = 1.0
        self._first_cdf = torch.cumsum(first_dist.double(), -1)
        self._first_cdf[-1] = 1.0
        self._log_t = torch.log(transition.clamp_min(1e-30))
        self._log_first = torch.log(first_dist.clamp_min(1e-30))

    @classmethod
    def from_text(cls, text: str, n_chars: int = 65, n_triggers: int = 3, *, bos: bool = True) -> BigramBackcopy:
        """Build the task from a corpus's character statistics (the ``n_chars`` most frequent characters)."""
        counts = Counter(text)
        if len(counts) < n_chars:
            raise InputError(f"corpus has only {len(counts)} distinct characters; data.n_chars={n_chars} needs more")
        chars = [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n_chars]]
        index = {c: i for i, c in enumerate(chars)}
        ids = torch.tensor([index.get(c, -1) for c in text], dtype=torch.long)
        ok = (ids[:-1] >= 0) & (ids[1:] >= 0)
        pairs = ids[:-1][ok] * n_chars + ids[1:][ok]
        bigram = torch.bincount(pairs, minlength=n_chars * n_chars).view(n_chars, n_chars).double()
        empty = bigram.sum(-1) == 0
        bigram[empty] = 1.0  # a character never followed by a kept one: uniform next character
        transition = (bigram / bigram.sum(-1, keepdim=True)).float()
        marginal = torch.bincount(ids[ids >= 0], minlength=n_chars).double()
        marginal[:n_triggers] = 0.0
        first = (marginal / marginal.sum()).float()
        return cls(chars, transition, first, n_triggers, bos=bos)

    @classmethod
    def from_file(cls, path: str | Path, n_chars: int = 65, n_triggers: int = 3, *, bos: bool = True) -> BigramBackcopy:
        text = read_text_file(path, "data file")  # a binary or blank file: one-line InputError
        text = clean_wikitext(text.replace("\r\n", "\n").replace("\r", "\n"))  # universal newlines, as before
        return cls.from_text(text, n_chars, n_triggers, bos=bos)

    def sample(self, generator: torch.Generator, batch_size: int, length: int) -> Tensor:
        """``(batch_size, length)`` token ids starting with BOS, or with the first character when ``bos`` is off
        (inverse-CDF sampling, fully vectorised per step)."""
        u = torch.rand(batch_size, length, generator=generator, dtype=torch.float64)
        x = torch.empty(batch_size, length, dtype=torch.long)
        first = int(self.bos)  # position of the first character
        x[:, 0] = self.bos_id
        last = len(self.chars) - 1
        if length > first:
            drawn = torch.searchsorted(self._first_cdf, u[:, first:first + 1].contiguous())
            x[:, first] = drawn.squeeze(1).clamp_max(last)
        for t in range(first, length - 1):
            cur = x[:, t]
            nxt = torch.searchsorted(self._cdf[cur], u[:, t + 1: t + 2].contiguous()).squeeze(1).clamp_max(last)
            # the first character is never a trigger, so x[t - 1] is only read for t > first
            x[:, t + 1] = torch.where(self.is_trigger[cur], x[:, max(t - 1, 0)], nxt)
        return x

    def batch(self, seed: int, step: int, batch_size: int, seq_len: int, stream: int = 0) -> LMBatch:
        """The batch of ``step``: inputs ``(B, seq_len)`` (BOS first if any), next-token targets, loss on all positions.

        Classes (queries): ``trigger`` (the input token is a trigger: the head should copy) and
        ``non_trigger`` (any other non-BOS position). Parts (loss): ``copy`` and ``bigram``.
        """
        x = self.sample(step_generator(seed, step, stream), batch_size, seq_len + 1)
        idx, targets = x[:, :-1], x[:, 1:]
        trig = self.is_trigger[idx]  # (B, T)
        not_bos = idx != self.bos_id
        oracle = -self._log_t[idx.clamp_max(len(self.chars) - 1), targets.clamp_max(len(self.chars) - 1)]
        if self.bos:
            oracle[:, 0] = -self._log_first[targets[:, 0]]
        oracle = torch.where(trig, torch.zeros_like(oracle), oracle)
        return LMBatch(
            idx=idx, targets=targets, loss_mask=torch.ones_like(idx, dtype=torch.bool),
            classes={"trigger": trig, "non_trigger": not_bos & ~trig},
            parts={"copy": trig, "bigram": ~trig}, oracle_nll=oracle,
        )

    def describe(self) -> dict[str, object]:
        return {"vocab_size": self.vocab_size, "bos_id": self.bos_id, "bos": self.bos,
                "triggers": [self.chars[i] for i in range(self.n_triggers)]}
