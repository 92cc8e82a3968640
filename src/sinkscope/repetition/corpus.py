"""Ordinary-text samples (plain and chat-formatted) used to calibrate patches and to measure their side effects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sinkscope.corpora import corpus_path
from sinkscope.errors import InputError
from sinkscope.io import read_text_file


def read_corpus(path: str | Path | None) -> str:
    """The text of ``path`` (UTF-8), or the shipped WikiText-2 validation text when ``path`` is None
    (`sinkscope.corpora.corpus_path`)."""
    return read_text_file(corpus_path() if path is None else path, "corpus file")


def text_chunks(tokenizer: Any, text: str, *, n: int, length: int, offset: int = 0, wrap: bool = True
                ) -> list[list[int]]:
    """``n`` consecutive chunks of ``length`` token ids, starting ``offset`` chunks into the text (no special
    tokens; the chunk's first token is its sink).

    A text too short for them is repeated (``wrap``) or refused (``wrap=False``: where repeating a short text
    would not be ordinary text, e.g. the circuit's baseline)."""
    if n < 1 or length < 2:
        raise InputError(f"need at least 1 chunk of at least 2 tokens, got {n} x {length}")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    need = (offset + n) * length
    if len(ids) < need and not wrap:
        raise InputError(f"the corpus has {len(ids)} tokens; {need} are needed for {n} ordinary-text samples of "
                         f"{length} tokens (after skipping {offset * length}): give a longer --corpus")
    if len(ids) < need:
        reps = -(-need // max(len(ids), 1))
        ids = (ids * reps)[:need]
    return [ids[(offset + i) * length:(offset + i + 1) * length] for i in range(n)]


def chat_samples(tokenizer: Any, text: str, *, n: int, words: int = 40, offset: int = 0) -> list[list[int]]:
    """``n`` chat-formatted samples: a user turn and an assistant answer cut from ``text`` (calibrates on the
    chat template's special tokens, which appear at positions > 0 in instruction prompts)."""
    tokens = text.split()
    out = []
    for i in range(n):
        a = (offset + i) * 2 * words
        chunk = tokens[a % max(len(tokens) - 2 * words, 1):][: 2 * words]
        user, answer = " ".join(chunk[:words]), " ".join(chunk[words:])
        msgs = [{"role": "user", "content": f"Continue this text: {user}"}, {"role": "assistant", "content": answer}]
        if getattr(tokenizer, "chat_template", None):
            res = tokenizer.apply_chat_template(msgs, tokenize=True)
            ids = res["input_ids"] if hasattr(res, "keys") else res
        else:
            ids = tokenizer(f"User: {user}\nAssistant: {answer}", add_special_tokens=True)["input_ids"]
        out.append([int(t) for t in ids])
    return out


def calibration_sequences(tokenizer: Any, text: str, *, n_text: int = 24, length: int = 64, n_chat: int = 12
                          ) -> list[list[int]]:
    """Ordinary text that defines each neuron's ordinary range: plain chunks from the start of ``text`` plus
    chat-formatted samples."""
    return text_chunks(tokenizer, text, n=n_text, length=length) + chat_samples(tokenizer, text, n=n_chat)


def heldout_sequences(tokenizer: Any, text: str, *, n_text: int = 16, length: int = 128, n_chat: int = 8
                      ) -> list[list[int]]:
    """Ordinary text disjoint from `calibration_sequences` (later chunks), for side-effect measurements."""
    return (text_chunks(tokenizer, text, n=n_text, length=length, offset=100)
            + chat_samples(tokenizer, text, n=n_chat, offset=300))
