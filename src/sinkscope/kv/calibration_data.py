"""The shipped DEV calibration text for `sinkscope.kv.calibrate`: prose, code and synthetic retrieval prompts.

DEV / EVAL split (the evaluation suite uses only EVAL data, so a policy is never scored on its calibration text):

* prose: the shipped WikiText-2 validation file (`sinkscope.corpora.corpus_path`). An *article* starts at a
  heading line `` = Title = `` (one ``=`` on each side). **DEV = the articles that start in the first half of the
  file by characters; EVAL = the articles that start in the second half** (`DEV_PROSE_RULE`).
* code: ``sinkscope/data/kv/calibration/textwrap_py.txt`` (CPython's ``textwrap.py``, PSF licence) is DEV; the
  evaluation suite ships a different sample.
* synthetic retrieval prompts: generated here from seeds ``< 1000`` (`DEV_SEEDS`); EVAL uses seeds ``>= 1000``.

Everything is cut into pieces of the target length in tokens. Two disjoint sets come out (`calibration_sets`):
the *ranking* set, whose attention masses rank the heads, and the *held-out* set, on which the policy's KL to the
dense model is measured.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from sinkscope.errors import InputError

DEV_PROSE_RULE = "DEV = WikiText-2 articles (' = Title = ' lines) starting in the first half of the file by characters"
#: seeds of the DEV synthetic prompts; EVAL uses seeds >= 1000
DEV_SEEDS = range(0, 1000)
CODE_FILE = "textwrap_py.txt"
_HEADING = re.compile(r"^ = [^=].* = $", re.MULTILINE)


def article_starts(text: str) -> list[int]:
    """Character offsets of the article headings (`` = Title = `` lines) of a WikiText file."""
    return [m.start() for m in _HEADING.finditer(text)]


def split_articles(text: str) -> tuple[list[str], list[str]]:
    """``(dev, eval)`` articles of a WikiText file: an article is DEV iff its heading starts before ``len(text) / 2``.

    >>> t = " = A = \\n a a \\n = B = \\n b b b b b b b b b b b b b \\n"
    >>> dev, ev = split_articles(t)
    >>> [a.split()[1] for a in dev], [a.split()[1] for a in ev]
    (['A', 'B'], [])
    """
    starts = article_starts(text)
    if not starts:
        raise InputError("no ' = Title = ' article headings found in the prose corpus")
    bounds = [*starts, len(text)]
    half = len(text) / 2
    dev = [text[a:b] for a, b in zip(bounds, bounds[1:]) if a < half]
    ev = [text[a:b] for a, b in zip(bounds, bounds[1:]) if a >= half]
    return dev, ev


def dev_prose() -> str:
    """The DEV articles of the shipped WikiText-2 file, joined."""
    from sinkscope.corpora import corpus_path

    return "".join(split_articles(corpus_path().read_text(encoding="utf-8"))[0])


def dev_code() -> str:
    """The shipped DEV code sample."""
    path = Path(str(resources.files("sinkscope").joinpath("data", "kv", "calibration", CODE_FILE)))
    if not path.is_file():
        raise InputError(f"the KV calibration code sample is missing from the installed package ({path})")
    return path.read_text(encoding="utf-8")


def retrieval_prompt(seed: int, filler: str, n_chars: int) -> str:
    """A synthetic retrieval prompt (deterministic in ``seed``): filler prose with a 5-digit pass key and a few
    ``key: value`` facts hidden at random depths, then the question. ``seed`` must be a DEV seed (< 1000)."""
    if seed not in DEV_SEEDS:
        raise InputError(f"calibration prompts use DEV seeds 0..999 (EVAL uses >= 1000), got {seed}")
    rng = random.Random(seed)
    start = rng.randrange(0, max(1, len(filler) - n_chars))
    body = filler[start:start + n_chars]
    key = rng.randrange(10000, 100000)
    facts = [f"The pass key is {key}. Remember it. {key} is the pass key."]
    names = [f"item-{rng.randrange(100, 1000)}" for _ in range(3)]
    facts += [f"The value of {n} is {rng.randrange(1000, 10000)}." for n in names]
    for fact in facts:
        at = rng.randrange(0, max(1, len(body)))
        body = body[:at] + " " + fact + " " + body[at:]
    asked = rng.choice(["pass key", *names])
    question = ("What is the pass key? The pass key is" if asked == "pass key"
                else f"What is the value of {asked}? It is")
    return body + "\n" + question


@dataclass(frozen=True)
class CalibrationSets:
    """Token pieces of the target length. ``ranking``: rank the heads; ``held_out``: measure the KL. ``text``: the
    text they were cut from (its SHA-256 goes into the policy); ``kinds``: per piece, prose/code/retrieval."""

    ranking: list[torch.Tensor]
    held_out: list[torch.Tensor]
    text: str
    ranking_kinds: list[str]
    held_out_kinds: list[str]


def _pieces(tokenizer, text: str, length: int, limit: int) -> list[torch.Tensor]:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    return [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)][:limit]


def calibration_sets(tokenizer, length: int, *, texts: list[str] | None = None, n_prose: int = 4, n_code: int = 2,
                     n_retrieval: int = 2, n_held_out: int = 3) -> CalibrationSets:
    """Ranking and held-out pieces of ``length`` tokens.

    Default (``texts=None``): the DEV mix, ``n_prose`` + ``n_code`` + ``n_retrieval`` ranking pieces and
    ``n_held_out`` held-out pieces (one prose, one code, one retrieval prompt, none shared with the ranking set).
    With ``texts`` (the user's own text): all their pieces of ``length`` tokens; every fourth piece is held out.

    Raises:
        InputError: the text gives fewer than two pieces of ``length`` tokens.
    """
    if texts is not None:
        joined = "\n\n".join(texts)
        pieces = _pieces(tokenizer, joined, length, 10**6)
        if len(pieces) < 2:
            raise InputError(f"the calibration text gives {len(pieces)} piece(s) of {length} tokens; it needs at least "
                             "2 (one to rank the heads, one held out to measure the KL): give more text or a shorter "
                             "--length", param="file")
        held = [p for i, p in enumerate(pieces) if i % 4 == 3] or [pieces[-1]]
        ranking = [p for i, p in enumerate(pieces) if i % 4 != 3] if len(pieces) > 1 and any(
            i % 4 == 3 for i in range(len(pieces))) else pieces[:-1]
        return CalibrationSets(ranking, held, joined, ["file"] * len(ranking), ["file"] * len(held))
    prose, code = dev_prose(), dev_code()
    n_chars = 6 * length  # plenty: pieces are cut to `length` tokens
    prose_pieces = _pieces(tokenizer, prose[: (n_prose + 1) * n_chars * 2], length, n_prose + 1)
    code_pieces = _pieces(tokenizer, code, length, n_code + 1)
    prompts = [retrieval_prompt(seed, prose, n_chars) for seed in range(n_retrieval + 1)]
    retrieval = []
    for p in prompts:
        ids = tokenizer(p, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        retrieval.append(ids[-length:])  # keep the question at the end
    if len(prose_pieces) < n_prose + 1 or len(code_pieces) < 2:
        raise InputError(f"the shipped calibration text is too short for {length}-token pieces: use a shorter "
                         "--length or --file", param="length")
    n_code = min(n_code, len(code_pieces) - 1)
    ranking = [*prose_pieces[:n_prose], *code_pieces[:n_code], *retrieval[:n_retrieval]]
    kinds = ["prose"] * n_prose + ["code"] * n_code + ["retrieval"] * n_retrieval
    held = [prose_pieces[n_prose], code_pieces[n_code], retrieval[n_retrieval]][:n_held_out]
    held_kinds = ["prose", "code", "retrieval"][:n_held_out]
    text = "\n\n".join([prose[: (n_prose + 1) * n_chars * 2], code, *prompts])
    return CalibrationSets(ranking, held, text, kinds, held_kinds)
