"""Language modelling on a local text file (bytes or the SmolLM2 tokenizer), with Gu et al.'s data switches.

Chunks are drawn at random offsets of the training split (the first ``1 - eval_split`` of the file), with or
without a BOS token at position 0. Switches (Gu et al. 2410.10781 §5): a fixed token at position ``j``, a
uniformly random token at position ``j``, a prefix LM (the prefix attends bidirectionally and carries no loss).
Evaluation batches hold text rows from the held-out split and random-token rows (query classes ``text`` and
``random``: the same head can be active on one and dormant on the other).

>>> task = TextLM.from_text("hello world, " * 200, tokenizer="bytes")
>>> b = task.batch(seed=0, step=3, batch_size=2, seq_len=8)
>>> b.idx.shape, int(b.idx[0, 0]) == task.bos_id
(torch.Size([2, 8]), True)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from sinkscope.corpora import corpus_path
from sinkscope.errors import InputError
from sinkscope.tasks.batch import LMBatch, step_generator



def encode(text: str, tokenizer: str) -> tuple[Tensor, int, int]:
    """Token ids of ``text`` ``(N,)``, vocabulary size and BOS id for ``bytes`` or ``smollm2``."""
    if tokenizer == "bytes":
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long), 257, 256
    if tokenizer == "smollm2":
        from sinkscope.models.load import load_tokenizer

        tok = load_tokenizer("smollm2-135m")  # the embedded model's tokenizer, without its weights
        ids = tok(text, add_special_tokens=False)["input_ids"]
        bos = tok.bos_token_id if tok.bos_token_id is not None else 0
        return torch.tensor(ids, dtype=torch.long), len(tok), int(bos)
    raise InputError(f"unknown tokenizer {tokenizer!r} (choose from bytes, smollm2)")


class TextLM:
    """Next-token prediction on chunks of one tokenised text."""

    def __init__(self, ids: Tensor, vocab_size: int, bos_id: int, *, bos: bool = True, eval_split: float = 0.05,
                 fixed_token_pos: int | None = None, fixed_token_id: int = 0, random_token_pos: int | None = None,
                 prefix_len: int = 0) -> None:
        n_eval = max(int(len(ids) * eval_split), 1)
        self.train_ids, self.eval_ids = ids[:-n_eval], ids[-n_eval:]
        self.vocab_size, self.bos_id, self.bos = vocab_size, bos_id, bos
        self.fixed_token_pos, self.fixed_token_id = fixed_token_pos, fixed_token_id
        self.random_token_pos, self.prefix_len = random_token_pos, prefix_len
        if not 0 <= fixed_token_id < vocab_size:
            raise InputError(f"data.fixed_token_id={fixed_token_id} is outside the vocabulary (size {vocab_size})")

    @classmethod
    def from_text(cls, text: str, tokenizer: str = "bytes", **kwargs) -> TextLM:
        ids, vocab, bos = encode(text, tokenizer)
        return cls(ids, vocab, bos, **kwargs)

    @classmethod
    def from_file(cls, path: str | Path | None, tokenizer: str = "bytes", **kwargs) -> TextLM:
        """Read ``path`` (default: the shipped WikiText-2 validation text, `sinkscope.corpora`)."""
        if path is None:
            path = corpus_path()
        path = Path(path)
        if not path.is_file():
            raise InputError(f"data file not found: {path}")
        return cls.from_text(path.read_text(encoding="utf-8", errors="replace"), tokenizer, **kwargs)

    def _chunks(self, ids: Tensor, g: torch.Generator, batch_size: int, seq_len: int) -> Tensor:
        """``(B, seq_len + 1)`` rows: optional BOS then consecutive tokens from random offsets."""
        n_text = seq_len + 1 - int(self.bos)
        if len(ids) <= n_text:
            raise InputError(f"text has {len(ids)} tokens, fewer than one chunk of {n_text}")
        starts = torch.randint(0, len(ids) - n_text, (batch_size,), generator=g)
        rows = ids[starts[:, None] + torch.arange(n_text)]
        if self.bos:
            rows = torch.cat([torch.full((batch_size, 1), self.bos_id, dtype=torch.long), rows], 1)
        return rows

    def _apply_switches(self, x: Tensor, g: torch.Generator) -> Tensor:
        if self.fixed_token_pos is not None:
            x[:, self.fixed_token_pos] = self.fixed_token_id
        if self.random_token_pos is not None:
            x[:, self.random_token_pos] = torch.randint(0, self.vocab_size, (x.shape[0],), generator=g)
        return x

    def _lm_batch(self, x: Tensor, classes: dict[str, Tensor]) -> LMBatch:
        idx, targets = x[:, :-1], x[:, 1:]
        mask = torch.ones_like(idx, dtype=torch.bool)
        if self.prefix_len:
            mask[:, : self.prefix_len - 1] = False  # inside the prefix the model sees the future
        return LMBatch(idx, targets, mask, classes=classes, prefix_len=self.prefix_len)

    def batch(self, seed: int, step: int, batch_size: int, seq_len: int, stream: int = 0) -> LMBatch:
        """Training batch of ``step`` (inputs ``(B, seq_len)``), a pure function of (seed, step)."""
        g = step_generator(seed, step, stream)
        x = self._apply_switches(self._chunks(self.train_ids, g, batch_size, seq_len), g)
        return self._lm_batch(x, {"text": torch.ones(batch_size, seq_len, dtype=torch.bool)})

    def eval_batch(self, seed: int, batch_size: int, seq_len: int) -> LMBatch:
        """Held-out text rows then random-token rows (classes ``text`` / ``random``); loss on text rows only."""
        g = step_generator(seed, 0, stream=99)
        n_text = max(batch_size - batch_size // 4, 1)
        text = self._apply_switches(self._chunks(self.eval_ids, g, n_text, seq_len), g)
        rand = torch.randint(0, self.vocab_size, (batch_size - n_text, seq_len + 1), generator=g)
        if self.bos:
            rand[:, 0] = self.bos_id
        x = torch.cat([text, rand], 0)
        is_text = torch.zeros(len(x), seq_len, dtype=torch.bool)
        is_text[:n_text] = True
        b = self._lm_batch(x, {"text": is_text, "random": ~is_text})
        b.loss_mask = b.loss_mask & is_text
        return b
