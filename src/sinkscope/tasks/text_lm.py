"""Language modelling on local text (bytes or the SmolLM2 tokenizer), with Gu et al.'s data switches.

The corpus is one text file, a directory (every UTF-8 text file under it, recursively, hidden folders skipped),
a glob (``src/**/*.py``) or ``python-stdlib`` (the ``*.py`` files of the running Python's standard library,
``sysconfig.get_paths()["stdlib"]``, without site-packages: ~30 MB of code and docstrings on every machine).
Several files are deduplicated by content (SHA-256; the first path in sorted order is kept) and split into
training and evaluation *by whole files*: a file is held out when the SHA-256 of its path relative to the
corpus root, read as a number, falls in the lowest ``eval_split`` share (stable across machines and when files
are added; at least one file each). The files are joined with a newline. One file: its last ``eval_split``
is held out. :meth:`TextLM.describe` (the run's ``task.json``) lists the held-out files.

Chunks are drawn at random offsets of the training split, with or without a BOS token at position 0. Switches (Gu et
al. 2410.10781 §5): a fixed token at position ``j``, a
uniformly random token at position ``j``, a prefix LM (the prefix attends bidirectionally and carries no loss).
Evaluation batches hold text rows from the held-out split and random-token rows (query classes ``text`` and
``random``: the same head can be active on one and dormant on the other); the switches apply to both kinds of row.

>>> task = TextLM.from_text("hello world, " * 200, tokenizer="bytes")
>>> b = task.batch(seed=0, step=3, batch_size=2, seq_len=8)
>>> b.idx.shape, int(b.idx[0, 0]) == task.bos_id
(torch.Size([2, 8]), True)
"""

from __future__ import annotations

import glob
import hashlib
import sysconfig
from pathlib import Path

import torch
from torch import Tensor

from sinkscope.corpora import corpus_path
from sinkscope.errors import InputError
from sinkscope.io import read_text_file
from sinkscope.tasks.batch import LMBatch, step_generator

PYTHON_STDLIB = "python-stdlib"
_SKIP_PARTS = {"site-packages", "dist-packages", "__pycache__"}


def encode(text: str | bytes, tokenizer: str) -> tuple[Tensor, int, int]:
    """Token ids of ``text`` ``(N,)`` (uint8 for bytes, int32 for smollm2), vocabulary size and BOS id for
    ``bytes`` or ``smollm2``. Batches convert their rows to int64."""
    if tokenizer == "bytes":
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), 257, 256
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    if tokenizer == "smollm2":
        from sinkscope.models.load import load_tokenizer

        tok = load_tokenizer("smollm2-135m")  # the embedded model's tokenizer, without its weights
        ids = tok(text, add_special_tokens=False)["input_ids"]
        bos = tok.bos_token_id if tok.bos_token_id is not None else 0
        return torch.tensor(ids, dtype=torch.int32), len(tok), int(bos)
    raise InputError(f"unknown tokenizer {tokenizer!r} (choose from bytes, smollm2)")


def corpus_files(spec: str) -> tuple[Path, list[Path]]:
    """The root folder and the sorted candidate files of a multi-file corpus spec (directory, glob or
    ``python-stdlib``). Raises InputError when nothing matches."""
    if spec == PYTHON_STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [p for p in root.rglob("*.py") if not _SKIP_PARTS & set(p.relative_to(root).parts)]
    elif any(ch in spec for ch in "*?["):
        parts = Path(spec).parts
        fixed = [p for p in parts[: next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))]]
        root = Path(*fixed) if fixed else Path(".")
        files = [Path(p) for p in glob.glob(spec, recursive=True)]
    else:
        root = Path(spec)
        files = [p for p in root.rglob("*") if not any(x.startswith(".") for x in p.relative_to(root).parts)]
    files = sorted(p for p in files if p.is_file())
    if not files:
        raise InputError(f"data.corpus {spec!r} matches no files")
    return root, files


def _held_out(rel: str, eval_split: float) -> bool:
    """Whether a file (path relative to the corpus root) belongs to the evaluation split."""
    return int(hashlib.sha256(rel.encode()).hexdigest()[:12], 16) / 16**12 < eval_split


def read_corpus(spec: str, eval_split: float) -> tuple[bytes, bytes, dict[str, object]]:
    """Training text, evaluation text and a description of a multi-file corpus (see the module docstring).

    Files that are not UTF-8 text (a NUL byte or invalid UTF-8) or empty are skipped; exact duplicates are
    dropped. Returns ``(train_bytes, eval_bytes, info)``; ``info`` lists the held-out files.
    """
    root, files = corpus_files(spec)
    seen: set[str] = set()
    train, held, eval_files = [], [], []
    info: dict[str, object] = {"corpus": spec, "root": str(root.resolve()), "candidate_files": len(files),
                               "duplicates_dropped": 0, "skipped_empty_or_binary": 0}
    kept: list[tuple[str, bytes]] = []
    for path in files:
        data = path.read_bytes()
        if not data or b"\0" in data:
            info["skipped_empty_or_binary"] += 1  # type: ignore[operator]
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            info["skipped_empty_or_binary"] += 1  # type: ignore[operator]
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            info["duplicates_dropped"] += 1  # type: ignore[operator]
            continue
        seen.add(digest)
        kept.append((path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path), data))
    if len(kept) < 2:
        raise InputError(f"data.corpus {spec!r} has {len(kept)} distinct text file(s); give at least 2, or one file")
    flags = [_held_out(rel, eval_split) for rel, _ in kept]
    if not any(flags):
        flags[-1] = True
    if all(flags):
        flags[0] = False
    for (rel, data), is_eval in zip(kept, flags):
        (held if is_eval else train).append(data)
        if is_eval:
            eval_files.append(rel)
    train_text, eval_text = b"\n".join(train), b"\n".join(held)
    info.update(files=len(kept), train_files=len(kept) - len(eval_files), eval_files_count=len(eval_files),
                train_bytes=len(train_text), eval_bytes=len(eval_text), eval_files=eval_files)
    return train_text, eval_text, info


class TextLM:
    """Next-token prediction on chunks of one tokenised text."""

    def __init__(self, ids: Tensor, vocab_size: int, bos_id: int, *, bos: bool = True, eval_split: float = 0.05,
                 fixed_token_pos: int | None = None, fixed_token_id: int = 0, random_token_pos: int | None = None,
                 prefix_len: int = 0) -> None:
        n_eval = max(int(len(ids) * eval_split), 1)
        self.train_ids, self.eval_ids = ids[:-n_eval], ids[-n_eval:]
        self.info: dict[str, object] = {}
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
        """Read a corpus: one file, a directory, a glob or ``python-stdlib`` (module docstring); default: the
        shipped WikiText-2 validation text (`sinkscope.corpora`)."""
        if path is None:
            path = corpus_path()
        spec = str(path)
        if Path(spec).is_file():
            text = read_text_file(spec, "data file")  # a binary or blank file: one-line InputError
            task = cls.from_text(text.replace("\r\n", "\n").replace("\r", "\n"), tokenizer, **kwargs)
            task.info = {"corpus": spec, "files": 1, "eval_split": kwargs.get("eval_split", 0.05),
                         "train_tokens": len(task.train_ids), "eval_tokens": len(task.eval_ids)}
            return task
        if spec != PYTHON_STDLIB and not Path(spec).is_dir() and not any(ch in spec for ch in "*?["):
            raise InputError(f"data file not found: {spec}")
        train, held, info = read_corpus(spec, kwargs.get("eval_split", 0.05))
        train_ids, vocab, bos = encode(train, tokenizer)
        eval_ids, _, _ = encode(held, tokenizer)
        task = cls(torch.cat([train_ids, eval_ids]), vocab, bos, **{**kwargs, "eval_split": len(eval_ids) / (
            len(train_ids) + len(eval_ids))})
        task.train_ids, task.eval_ids = train_ids, eval_ids  # exactly the file split, whatever the rounding
        task.info = {**info, "train_tokens": len(train_ids), "eval_tokens": len(eval_ids)}
        return task

    def describe(self) -> dict[str, object]:
        """What the task was built from (the run's ``task.json``): corpus, files, held-out files, token counts."""
        return {"vocab_size": self.vocab_size, "bos_id": self.bos_id, "bos": self.bos, **self.info}

    def _chunks(self, ids: Tensor, g: torch.Generator, batch_size: int, seq_len: int) -> Tensor:
        """``(B, seq_len + 1)`` rows: optional BOS then consecutive tokens from random offsets."""
        n_text = seq_len + 1 - int(self.bos)
        if len(ids) <= n_text:
            raise InputError(f"text has {len(ids)} tokens, fewer than one chunk of {n_text}")
        starts = torch.randint(0, len(ids) - n_text, (batch_size,), generator=g)
        rows = ids[starts[:, None] + torch.arange(n_text)].long()
        if self.bos:
            rows = torch.cat([torch.full((batch_size, 1), self.bos_id, dtype=torch.long), rows], 1)
        return rows

    def _apply_switches(self, x: Tensor, g: torch.Generator) -> Tensor:
        """Gu et al.'s switches on ``(B, seq_len + 1)`` rows, in place: every row's token at ``fixed_token_pos``
        becomes ``fixed_token_id``; the token at ``random_token_pos`` becomes a token drawn uniformly, per row,
        from the vocabulary without the BOS id (their ``x_1 ~ Uniform(V)``; BOS is the ``bos`` switch's)."""
        if self.fixed_token_pos is not None:
            x[:, self.fixed_token_pos] = self.fixed_token_id
        if self.random_token_pos is not None:
            tok = torch.randint(0, self.vocab_size - 1, (x.shape[0],), generator=g)
            x[:, self.random_token_pos] = tok + (tok >= self.bos_id).long()  # skip the BOS id
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
        rand = self._apply_switches(rand, g)  # a model trained with a fixed token at j sees it in every row
        x = torch.cat([text, rand], 0)
        is_text = torch.zeros(len(x), seq_len, dtype=torch.bool)
        is_text[:n_text] = True
        b = self._lm_batch(x, {"text": is_text, "random": ~is_text})
        b.loss_mask = b.loss_mask & is_text
        return b
