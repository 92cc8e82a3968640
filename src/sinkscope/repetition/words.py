"""Which words are for development and which for evaluation (issue 13's protocol).

* `DEV_WORDS`: every word the project ever used to build, tune, test or document a repetition patch: the
  built-in list `sinkscope.tasks.repeated_tokens.DEFAULT_WORDS` (scans, the circuit and patch builders, the old
  "held-out" evaluation, the integration test, the docs all drew from it). Design choices (gate lengths, patch
  layers, thresholds, which variant is the default) are made on these words only.
* `EVAL_WORDS`: words no design choice has seen. They were chosen before any generation with them, by this rule:
  95 common English words written down by category (animals, food, household objects, nature, places, people,
  abstract nouns); kept when they are one SmolLM2 token with a leading space (the run token the prompts use,
  `run_token_id`), are not in `DEFAULT_WORDS`, and do not occur as a quoted word anywhere in the repository's
  code, tests or docs (this dropped "lion", "rope" and "plan"). `_CANDIDATES` lists the 92 that passed, in the
  order written. Every third one (index % 3 == 2) is set aside as `SPARE_WORDS` (never run: a fresh held-out set
  for a later re-test); the other 62 are `EVAL_WORDS`.
  Nothing may be tuned on them: evaluate a design once it is frozen.

`tests/unit/repeat/test_words.py` checks the sets are disjoint, that every evaluation word is one token for the
tiny test tokenizer's rules, and (slow tier) for SmolLM2's tokenizer.
"""

from __future__ import annotations

from typing import Any

from sinkscope.errors import InputError
from sinkscope.tasks.repeated_tokens import DEFAULT_WORDS, run_token_id

#: the candidates that passed the filter, in the order written down, by category
_CANDIDATES: tuple[str, ...] = (
    # animals
    "cow", "pig", "sheep", "goat", "duck", "mouse", "rabbit", "bear", "wolf", "fox", "tiger", "snake", "frog",
    "bee", "ant", "owl", "whale", "deer",
    # food
    "cheese", "egg", "rice", "salt", "sugar", "butter", "meat", "soup", "cake", "fruit", "corn", "wine", "beer",
    "honey", "pie",
    # household
    "chair", "bed", "cup", "plate", "knife", "spoon", "bottle", "box", "bag", "key", "lamp", "clock", "mirror",
    "pen", "shoe", "hat", "coat", "shirt", "ring",
    # nature
    "hill", "lake", "sea", "sky", "cloud", "sand", "leaf", "grass", "rock", "ice", "storm",
    # places
    "town", "village", "farm", "shop", "hotel", "bridge", "tower", "castle", "wall", "street",
    # people
    "baby", "girl", "boy", "man", "woman", "uncle", "judge", "nurse", "pilot", "artist",
    # abstract
    "dream", "hope", "fear", "joy", "anger", "idea", "rule", "law", "price",
)

#: development words: everything the project has used so far (design and tuning happen on these only)
DEV_WORDS: tuple[str, ...] = tuple(dict.fromkeys(DEFAULT_WORDS))

#: evaluation words: never used for any design decision (see the module docstring for how they were chosen)
EVAL_WORDS: tuple[str, ...] = tuple(w for i, w in enumerate(_CANDIDATES) if i % 3 != 2)

#: held out from everything, including the evaluation (for a later re-test with fresh words)
SPARE_WORDS: tuple[str, ...] = tuple(w for i, w in enumerate(_CANDIDATES) if i % 3 == 2)

#: named word sets for ``--word-set``
WORD_SETS: dict[str, tuple[str, ...]] = {"dev": DEV_WORDS, "eval": EVAL_WORDS}


def word_set(name: str, tokenizer: Any | None = None) -> list[str]:
    """The words of a named set (``dev`` or ``eval``); with a tokenizer, checked to be single tokens.

    Raises:
        InputError: unknown set name, or a word that is not one token for ``tokenizer``.
    """
    if name not in WORD_SETS:
        raise InputError(f"unknown word set {name!r}; choose one of {', '.join(WORD_SETS)}")
    words = list(WORD_SETS[name])
    if tokenizer is not None:
        for w in words:
            run_token_id(tokenizer, w)
    return words
