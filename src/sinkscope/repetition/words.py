"""Every word list of the repeated-token study and the single-token check of a word.

Which words are for development and which for evaluation (issue 13's protocol).

* `DEV_WORDS`: every word the project ever used to build, tune, test or document a repetition patch: the
  built-in list `DEFAULT_WORDS` (scans, the circuit and patch builders, the old
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

`tests/unit/repetition/test_words.py` checks that the three sets are disjoint and follow the rule above, and (slow
tier) that every evaluation and spare word is one SmolLM2 token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sinkscope.comma_lists import split_items
from sinkscope.errors import InputError
from sinkscope.io import read_text_file

#: 120 common English words, single tokens (with a leading space) for GPT-2/Llama-3/SmolLM2-style BPE tokenisers.
DEFAULT_WORDS: tuple[str, ...] = (
    "poem", "company", "book", "cat", "dog", "house", "tree", "water", "fire", "music", "book", "city", "river",
    "money", "paper", "light", "table", "window", "door", "king", "queen", "game", "friend", "world", "school",
    "family", "child", "story", "heart", "night", "day", "sun", "moon", "star", "road", "car", "train", "ship",
    "bird", "fish", "horse", "apple", "bread", "milk", "coffee", "tea", "rain", "snow", "wind", "stone", "gold",
    "silver", "iron", "glass", "wood", "field", "garden", "flower", "forest", "mountain", "ocean", "island",
    "market", "bank", "church", "doctor", "teacher", "student", "soldier", "farmer", "power", "energy", "time",
    "life", "death", "love", "war", "peace", "truth", "art", "science", "history", "language", "number", "letter",
    "word", "voice", "song", "dance", "film", "picture", "color", "red", "blue", "green", "black", "white",
    "small", "big", "happy", "good", "new", "old", "long", "free", "open", "hot", "cold", "fast", "run", "walk",
    "eat", "sleep", "read", "write", "play", "work", "home", "office", "phone", "computer", "data", "system",
    "water", "market", "table", "hand", "eye", "face", "head", "body", "blood", "bone", "skin", "hair", "the",
    "a", "and", "one", "yes", "hello", "thing", "place", "part", "form", "end", "side", "line", "point",
)

#: Words the evaluation holds out from the words used to build a patch (disjoint from `PATCH_WORDS`).
PATCH_WORDS: tuple[str, ...] = (
    "poem", "company", "book", "cat", "dog", "house", "tree", "water", "fire", "music", "city", "river", "money",
    "paper", "light", "table", "window", "door", "king", "queen",
)


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


def default_words(tokenizer: Any | None = None, *, exclude: tuple[str, ...] = ()) -> list[str]:
    """The built-in word list, deduplicated, minus ``exclude``; with a tokenizer, only its single-token words."""
    seen: list[str] = []
    for w in DEFAULT_WORDS:
        if w not in seen and w not in exclude:
            seen.append(w)
    if tokenizer is not None:
        seen = [w for w in seen if _try_run_token(tokenizer, w) is not None]
    return seen


def heldout_words(tokenizer: Any | None = None) -> list[str]:
    """Default words not in `PATCH_WORDS` (used to evaluate a patch built on `PATCH_WORDS`)."""
    return default_words(tokenizer, exclude=PATCH_WORDS)


def read_words(path: str | Path) -> list[str]:
    """Words of a user file: one per line (``#`` comments and blank lines ignored)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"word file not found: {path}")
    words = [ln.split("#", 1)[0].strip() for ln in read_text_file(p, "word file").splitlines()]
    words = [w for w in words if w]
    if not words:
        raise InputError(f"word file has no words: {path}")
    return words


def _try_run_token(tokenizer: Any, word: str) -> int | None:
    unk = getattr(tokenizer, "unk_token_id", None)
    for cand in (" " + word.strip(), word.strip()):
        ids = tokenizer(cand, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and (unk is None or int(ids[0]) != unk):
            return int(ids[0])
    return None


def run_token_id(tokenizer: Any, word: str) -> int:
    """The id repeated in a run of ``word``: ``" word"`` if that is one token (so the run reads "word word
    word"), else ``"word"``. Raises InputError for empty or multi-token words and for a word the tokenizer maps
    to its unknown token."""
    if not word or not word.strip():
        raise InputError("empty word")
    tid = _try_run_token(tokenizer, word)
    if tid is None:
        ids = tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]
        unk = getattr(tokenizer, "unk_token_id", None)
        if len(ids) == 1 and unk is not None and int(ids[0]) == unk:
            raise InputError(f"word {word!r} is not in this tokenizer's vocabulary (it becomes the unknown token "
                             f"{tokenizer.unk_token!r}); give a word the tokenizer knows")
        raise InputError(f"word {word!r} is {len(ids)} tokens for this tokenizer; give a single-token word")
    return tid


@dataclass(frozen=True)
class WordChoice:
    """Which words a command runs, as given on the command line, checked before any model loads: explicit
    ``words`` (from ``--words`` or ``--words-file``, never both), else the named ``word_set``, else the command's
    default list; ``n_words`` keeps the first K. `resolve` checks each is one token for the tokenizer."""

    words: tuple[str, ...] | None = None
    word_set: str | None = None
    n_words: int | None = None

    def __post_init__(self) -> None:
        if self.words is not None and not self.words:
            raise InputError("--words: give at least one word (comma-separated)", param="words")
        if self.word_set is not None and self.word_set not in WORD_SETS:
            raise InputError(f"unknown word set {self.word_set!r}; choose one of {', '.join(WORD_SETS)}",
                             param="word_set")
        if self.n_words is not None and self.n_words < 1:
            raise InputError(f"--n-words must be a positive integer, got {self.n_words}", param="n_words")

    @classmethod
    def from_cli(cls, words: str | None, words_file: str | Path | None, n_words: int | None = None,
                 word_set: str | None = None) -> WordChoice:
        """From ``--words`` (comma-separated), ``--words-file`` (read now) and ``--n-words``."""
        if words is not None and words_file is not None:
            raise InputError("give --words or --words-file, not both", param="words")
        if words_file is not None:
            return cls(tuple(read_words(words_file)), None, n_words)
        if words is not None:
            return cls(split_items(words), None, n_words)
        return cls(None, word_set, n_words)

    def resolve(self, tokenizer: Any, default: Sequence[str] = ()) -> list[str]:
        """The words, each checked to be one token of ``tokenizer`` (`run_token_id`)."""
        if self.words is not None:
            ws = list(self.words)
        elif self.word_set is not None:
            ws = list(WORD_SETS[self.word_set])
        else:
            ws = list(default)
        if self.n_words is not None:
            ws = ws[:self.n_words]
        if not ws:
            raise InputError("no words to use", param="words")
        for w in ws:
            run_token_id(tokenizer, w)
        return ws
