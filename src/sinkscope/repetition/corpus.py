"""Ordinary-text samples (plain and chat-formatted) used to calibrate patches and to measure their side effects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sinkscope.errors import InputError
from sinkscope.io import read_text_file

#: A few built-in English paragraphs, used when no corpus file is given.
BUILTIN_TEXT = (
    "The river runs through the old town, past the market and the stone bridge that was built three centuries "
    "ago. In summer the children swim near the mill, and in winter the water freezes along the banks. ",
    "Photosynthesis converts light energy into chemical energy. Plants absorb carbon dioxide and water and, "
    "using sunlight, produce glucose and oxygen. The process takes place mainly in the leaves. ",
    "She opened the letter slowly, unsure whether she wanted to know what it said. Outside, the rain had "
    "stopped, and a thin light came through the clouds over the harbour. ",
    "To install the package, run the installer and follow the instructions on the screen. If the program does "
    "not start, check that your system meets the minimum requirements listed below. ",
    "The committee met on Tuesday to discuss the budget for the next year. Several members argued that the "
    "funds for public libraries should be increased, while others wanted to cut spending. ",
    "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n",
)


def read_corpus(path: str | Path | None) -> str:
    """The text of ``path`` (UTF-8), or the built-in paragraphs when ``path`` is None."""
    if path is None:
        return " ".join(BUILTIN_TEXT * 4)
    return read_text_file(path, "corpus file")


def text_chunks(tokenizer: Any, text: str, *, n: int, length: int, offset: int = 0) -> list[list[int]]:
    """``n`` consecutive chunks of ``length`` token ids, starting ``offset`` chunks into the text (no special
    tokens; the chunk's first token is its sink)."""
    if n < 1 or length < 2:
        raise InputError(f"need at least 1 chunk of at least 2 tokens, got {n} x {length}")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    need = (offset + n) * length
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
