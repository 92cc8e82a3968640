"""Token inputs for measurements: text, files, uniformly random tokens and runs of one repeated token, and the
one padding helper that turns id lists into a batch.

Every batch records its BOS policy (``auto``: whatever the tokenizer adds; ``always``: make sure a BOS is at
position 0; ``never``: strip a leading BOS), because "first token" vs "BOS" is the main confound in sink studies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sinkscope.errors import InputError
from sinkscope.io import read_text_file

BOS_POLICIES = ("auto", "always", "never")


@dataclass(frozen=True)
class TokenBatch:
    """Token id sequences plus what they are.

    Attributes:
        sequences: one list of token ids per sample (BOS included when prepended).
        kind: ``text`` | ``file`` | ``random`` | ``repeat`` | ``ids``.
        bos: the BOS policy asked for.
        bos_prepended: whether position 0 of every sample is the tokenizer's BOS token.
        meta: description of the input (texts' first characters, word, times, seed, ...).
    """

    sequences: list[list[int]]
    kind: str
    bos: str = "auto"
    bos_prepended: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.sequences:
            raise InputError("no input samples")
        if any(len(s) == 0 for s in self.sequences):
            raise InputError("an input sample has no tokens (empty text?)")

    @property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.sequences]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "samples": len(self.sequences), "lengths": self.lengths, "bos": self.bos,
                "bos_prepended": self.bos_prepended, **self.meta}


def _is_id(t: Any) -> bool:
    """An integer token id: a Python or numpy integer (not a bool, not a float)."""
    return not isinstance(t, (bool, float)) and hasattr(t, "__index__")


def _id_rows(x: Any, name: str) -> list[list[int]]:
    """``x`` (a tensor / array / nested sequence of ints, 1-D = one sample, 2-D = samples) as lists of ints."""
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
        raise InputError(f"{name} must be token ids: a list of lists of ints (or a 1-D/2-D tensor), "
                         f"got {type(x).__name__}", param=name)
    rows: list[Any] = [list(x)] if x and all(_is_id(t) for t in x) else list(x)
    out = []
    for r in rows:
        if hasattr(r, "tolist"):
            r = r.tolist()
        if isinstance(r, (str, bytes)) or not isinstance(r, Sequence):
            raise InputError(f"{name} must be token ids: a list of lists of ints (or a 1-D/2-D tensor), "
                             f"found {type(r).__name__}", param=name)
        bad = next((t for t in r if not _is_id(t)), None)
        if bad is not None:
            raise InputError(f"{name} must hold integer token ids, found {bad!r} ({type(bad).__name__})",
                             param=name)
        out.append([int(t) for t in r])
    return out


def as_token_batch(batch: Any) -> TokenBatch:
    """A `TokenBatch` from what users hand the profiler.

    Accepts a `TokenBatch`; lists of token-id lists (or one flat list, or a 1-D/2-D tensor); or a tokenizer's
    output: a ``BatchEncoding`` or any mapping with ``input_ids`` and optionally ``attention_mask`` (lists or
    tensors). With a mask, each row keeps only its real tokens (mask 1), so left- and right-padded batches
    give the same samples.

    >>> as_token_batch({"input_ids": [[0, 5, 6], [7, 8, 9]], "attention_mask": [[0, 1, 1], [1, 1, 1]]}).sequences
    [[5, 6], [7, 8, 9]]

    Raises:
        InputError: anything else (one line naming what was given).
    """
    if isinstance(batch, TokenBatch):
        return batch
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise InputError(f"a mapping of inputs needs 'input_ids' (got keys: {', '.join(map(str, batch))})")
        rows = _id_rows(batch["input_ids"], "input_ids")
        if batch.get("attention_mask") is not None:
            masks = _id_rows(batch["attention_mask"], "attention_mask")
            if [len(m) for m in masks] != [len(r) for r in rows]:
                raise InputError("attention_mask and input_ids have different shapes")
            rows = [[t for t, m in zip(r, mk) if m] for r, mk in zip(rows, masks)]
        return TokenBatch(rows, "ids")
    if isinstance(batch, (str, bytes)):
        raise InputError("batch is text: tokenise it first (sinkscope.text_inputs(tokenizer, [text]))")
    return TokenBatch(_id_rows(batch, "batch"), "ids")


def _check_policy(bos: str) -> None:
    if bos not in BOS_POLICIES:
        raise InputError(f"unknown BOS policy bos={bos!r}; choose one of {', '.join(BOS_POLICIES)}", param="bos")


def apply_bos(ids: list[int], tokenizer: Any, bos: str) -> tuple[list[int], bool]:
    """Apply a BOS policy to one token sequence; returns the ids and whether position 0 is BOS."""
    _check_policy(bos)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    starts = bool(ids) and bos_id is not None and ids[0] == bos_id
    if bos == "always":
        if bos_id is None:
            raise InputError("bos='always': this tokenizer has no BOS token", param="bos")
        return (ids if starts else [bos_id, *ids]), True
    if bos == "never" and starts:
        return ids[1:], False
    return ids, starts


def text_inputs(tokenizer: Any, texts: str | Sequence[str], *, bos: str = "auto", max_tokens: int | None = None,
                kind: str = "text", meta: dict[str, Any] | None = None) -> TokenBatch:
    """Tokenise texts (one sample each; a single ``str`` is one sample). ``max_tokens`` truncates each sample
    after the BOS policy.

    Raises:
        InputError: no text, a blank text, or something that is not text.
    """
    _check_policy(bos)
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(texts, bytes) or not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise InputError(f"texts must be a str or a list of str, got {type(texts).__name__}", param="texts")
    if not texts or any(not t.strip() for t in texts):
        raise InputError("empty text: give at least one non-blank text")
    if max_tokens is not None and max_tokens < 1:
        raise InputError(f"max_tokens must be a positive integer, got {max_tokens}", param="max_tokens")
    seqs, flags = [], []
    for t in texts:
        ids, has_bos = apply_bos(list(tokenizer(t, add_special_tokens=True)["input_ids"]), tokenizer, bos)
        seqs.append(ids[:max_tokens] if max_tokens else ids)
        flags.append(has_bos)
    info = {"preview": [t[:80] for t in texts[:5]], **(meta or {})}
    return TokenBatch(seqs, kind, bos, all(flags), info)


def file_inputs(tokenizer: Any, path: str | Path, *, bos: str = "auto", max_tokens: int | None = None,
                samples: int = 1) -> TokenBatch:
    """Read a UTF-8 text file; with ``samples > 1`` cut it into that many consecutive chunks of ``max_tokens``."""
    p = Path(path)
    text = read_text_file(p, "input file")
    if samples < 1:
        raise InputError(f"samples must be a positive integer, got {samples}", param="samples")
    if samples == 1:
        return text_inputs(tokenizer, [text], bos=bos, max_tokens=max_tokens, kind="file", meta={"file": str(p)})
    if not max_tokens:
        raise InputError("cutting a file into several samples needs max_tokens", param="max_tokens")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) < samples * max_tokens:
        raise InputError(f"{path} has {len(ids)} tokens, fewer than samples*max_tokens = {samples * max_tokens}")
    seqs, flags = [], []
    for i in range(samples):
        chunk = ids[i * max_tokens:(i + 1) * max_tokens]
        if bos == "always":
            chunk = [tokenizer.bos_token_id, *chunk[:-1]] if tokenizer.bos_token_id is not None else chunk
        chunk, has = apply_bos(chunk, tokenizer, bos)
        seqs.append(chunk)
        flags.append(has)
    return TokenBatch(seqs, "file", bos, all(flags), {"file": str(p), "chunk_tokens": max_tokens})


def random_inputs(tokenizer: Any, n_tokens: int, samples: int = 1, *, bos: str = "auto", seed: int = 0,
                  vocab_size: int | None = None) -> TokenBatch:
    """Uniformly random non-special tokens, ``samples`` sequences of ``n_tokens`` (plus BOS under ``always``)."""
    _check_policy(bos)
    if n_tokens < 1 or samples < 1:
        raise InputError(f"random inputs need positive token and sample counts, got {n_tokens} x {samples}")
    vocab = vocab_size or len(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    allowed = torch.tensor([i for i in range(vocab) if i not in special])
    g = torch.Generator().manual_seed(seed)
    seqs, flags = [], []
    for _ in range(samples):
        ids = allowed[torch.randint(len(allowed), (n_tokens,), generator=g)].tolist()
        ids, has = apply_bos(ids, tokenizer, bos)
        seqs.append(ids)
        flags.append(has)
    return TokenBatch(seqs, "random", bos, all(flags), {"seed": seed, "n_tokens": n_tokens})


def single_token_id(tokenizer: Any, word: str) -> int:
    """The one token id of ``word`` (tried as given, then with a leading space); InputError if multi-token."""
    if not word or not word.strip():
        raise InputError("empty word")
    for candidate in (word, " " + word) if not word.startswith(" ") else (word,):
        ids = tokenizer(candidate, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            return int(ids[0])
    n = len(tokenizer(word, add_special_tokens=False)["input_ids"])
    raise InputError(f"word {word!r} is {n} tokens for this tokenizer; give a single-token word")


def repeat_inputs(tokenizer: Any, word: str, times: int, *, bos: str = "auto", prefix: str = "") -> TokenBatch:
    """One sample: an optional text prefix, then one token id repeated ``times`` times (built from the id,
    never from joined text, which BPE would tokenise differently)."""
    if times < 1:
        raise InputError(f"times must be a positive integer, got {times}", param="times")
    tid = single_token_id(tokenizer, word)
    pre = list(tokenizer(prefix, add_special_tokens=True)["input_ids"]) if prefix else []
    if not prefix:
        base = list(tokenizer("", add_special_tokens=True)["input_ids"])  # whatever specials 'auto' adds
        pre = base
    ids, has = apply_bos(pre + [tid] * times, tokenizer, bos)
    return TokenBatch([ids], "repeat", bos, has, {"word": word, "token_id": tid, "times": times,
                                                  "token": tokenizer.convert_ids_to_tokens(tid)})


@dataclass(frozen=True)
class InputSpec:
    """Which inputs to measure, as the CLI's input options say, checked when built (before any model loads);
    `tokens` makes the `TokenBatch` once a tokenizer is there. Exactly one of ``text``, ``file``, ``random``,
    ``repeat`` is given.

    Attributes:
        text: texts, one sample each.
        file: a UTF-8 text file (cut into ``samples`` chunks of ``max_tokens`` when ``samples > 1``).
        random: tokens per sample of uniformly random non-special tokens (``samples`` of them, ``seed``).
        repeat: a single-token word repeated ``times`` times.
        bos: BOS policy (`BOS_POLICIES`); max_tokens: truncate each sample to this many tokens.

    Raises:
        InputError: none or several inputs, a count below 1, an unknown BOS policy, a file that is missing, a
            directory, empty or not text.
    """

    text: tuple[str, ...] = ()
    file: str | None = None
    random: int | None = None
    repeat: str | None = None
    times: int | None = None
    samples: int = 1
    bos: str = "auto"
    max_tokens: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        given = [n for n, v in (("text", self.text), ("file", self.file), ("random", self.random),
                                ("repeat", self.repeat)) if v not in (None, (), [])]
        if len(given) != 1:
            raise InputError("give exactly one input: --text, --file, --random N or --repeat WORD --times N"
                             + (f" (got {', '.join('--' + g for g in given)})" if given else ""))
        _check_policy(self.bos)
        for name in ("samples", "random", "times", "max_tokens"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise InputError(f"{name} must be a positive integer, got {v!r}", param=name)
        if self.repeat is not None and self.times is None:
            raise InputError("--repeat WORD needs --times N")
        if self.text and any(not t.strip() for t in self.text):
            raise InputError("empty text: give at least one non-blank text")
        if self.file is not None:
            read_text_file(self.file, "--file")  # missing, a directory, empty or binary: refused now

    def tokens(self, tokenizer: Any) -> TokenBatch:
        """The `TokenBatch` these options describe, tokenised by ``tokenizer``."""
        if self.text:
            return text_inputs(tokenizer, list(self.text), bos=self.bos, max_tokens=self.max_tokens)
        if self.file is not None:
            return file_inputs(tokenizer, self.file, bos=self.bos, max_tokens=self.max_tokens, samples=self.samples)
        if self.random is not None:
            return random_inputs(tokenizer, self.random, self.samples, bos=self.bos, seed=self.seed)
        return repeat_inputs(tokenizer, str(self.repeat), int(self.times or 0), bos=self.bos)


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, *, side: str = "right",
              device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Pad id lists into one batch: ``ids`` (B, T) long and ``attention_mask`` (B, T) long (1 = real token).

    ``side="right"``: each row starts at position 0 (what the profiler runs: position 0 is every row's first
    token). ``side="left"``: each row ends at ``T - 1`` and starts at ``T - len(row)`` (what generation needs).

    >>> ids, mask = pad_batch([[5, 6, 7], [8]], 0, side="left")
    >>> ids.tolist(), mask.tolist()
    ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
    """
    if side not in ("right", "left"):
        raise InputError(f"side must be 'right' or 'left', got {side!r}")
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            cols = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
            ids[i, cols] = torch.tensor(list(s), dtype=torch.long)
            mask[i, cols] = 1
    return ids.to(device), mask.to(device)


def first_and_other(mask: Tensor) -> tuple[Tensor, Tensor]:
    """``mask`` (B, T) of real tokens -> (each row's first real token, its other real tokens), both (B, T) bool;
    works under left and right padding."""
    first_idx = mask.long().argmax(dim=1)  # (B,)
    first = torch.zeros_like(mask, dtype=torch.bool)
    first[torch.arange(mask.shape[0], device=mask.device), first_idx] = True
    return first, mask.bool() & ~first
