"""Shared fixtures of the kv evaluation tests: a character tokenizer that fits the tiny models' vocabulary."""

from __future__ import annotations

import pytest


class CharTokenizer:
    """Printable ASCII (32..126) -> ids 4..98, everything else (newlines) -> the id of a space; invertible on
    printable text. Enough of the Hugging Face tokenizer interface for the suite and the harness."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) - 28 if 32 <= ord(c) <= 126 else 4 for c in text]}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(int(i) + 28) if 4 <= int(i) <= 98 else "?" for i in ids)


@pytest.fixture
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer()


#: EVAL-like prose for tests: many sentences, no digits (so a key in a prompt is the needle's)
PROSE = " ".join(f"The {w} stood near the old {v} in the morning light ." for w in
                 ("tower", "house", "river", "garden", "bridge", "market", "church", "harbour") * 40
                 for v in ("wall", "road", "field"))
CODE = "\n".join(f"def f{i}(x):\n    return x * {i % 7} + {i % 5}\n" for i in range(400))
