"""The long-context suite of `sinkscope kv eval`: retrieval prompts and long streams on text never used to calibrate.

Disjoint from calibration by construction:

* **Prose.** The shipped WikiText-2 file (`sinkscope.corpora.corpus_path`) is split by articles (heading lines
  ``' = Title = '``): an article whose heading starts in the second half of the file (by characters) is **EVAL**,
  every other article is **DEV** (calibration). `split_articles` is the one home of that split.
* **Code.** The EVAL code stream is a chunk of CPython 3.11's ``fractions.py`` shipped in
  ``sinkscope/data/kv/eval/`` (PSF licence, see ``sinkscope/data/README.md``), not the calibration sample.
* **Synthetic prompts.** Keys, names, haystack offsets and depths come from ``random.Random(seed)`` with seeds
  ``>= EVAL_SEED_BASE`` (1000); calibration uses seeds below it.

Tasks (every prompt is a list of token ids of exactly the requested length, built in token space so that the
needle sits at a known token span):

* ``passkey``: an instruction (`PASSKEY_PREFIX`), then EVAL prose with a 5-digit key (``" The pass key is 12345.
  Remember it. 12345 is the pass key."``) after the sentence end nearest its depth (fraction of the haystack before
  it), then ``"\\nWhat is the pass key? The pass key is"``; plain completion, greedy, right when the first number
  in the continuation is the key.
* ``multikey``: ``n_keys`` sentences ``" The value of key NAME is 12345."`` spread through the haystack; the question
  asks for one of them (at the prompt's ``depth``); the other keys are distractors.
* ``prose`` / ``code`` streams: ``length`` tokens of EVAL prose or code; the last ``score_tokens`` are scored (KL to
  the dense model's next-token distribution, perplexity) after the first ``length - score_tokens`` were prefilled.
* ``agree``: an EVAL prose prompt of ``length`` tokens; the greedy continuation is compared with the dense model's.

Every item has a ``key`` naming its task, length, depth and seed; the evaluation keys its results by it.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from sinkscope.corpora import corpus_path
from sinkscope.errors import InputError

#: synthetic EVAL items use seeds from here on; calibration (DEV) uses seeds below it
EVAL_SEED_BASE = 1000
#: a WikiText-2 article heading: `` = Title = `` alone on its line (sub-headings are `` = = Sub = = ``)
_HEADING = re.compile(r"(?m)^ = [^=].* = $")
#: the shipped EVAL code sample (inside ``sinkscope/data/kv/eval``)
CODE_SAMPLE = "code_fractions.txt"

#: the instruction that opens a passkey prompt (the Landmark-attention passkey task's wording)
PASSKEY_PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                  "I will quiz you about the important information there.\n")
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
MULTIKEY_PREFIX = ("There are several keys with values hidden inside a lot of irrelevant text. Find them and "
                   "memorize them. I will quiz you about one of them.\n")
MULTIKEY_NEEDLE = " The value of key {name} is {key}."
MULTIKEY_QUESTION = "\nWhat is the value of key {name}? The value of key {name} is"
#: names of the multi-key entries (one token-ish word each, distinct)
KEY_NAMES = ("apple", "river", "silver", "garden", "falcon", "copper", "meadow", "harbor", "candle", "violet")

TASKS = ("passkey", "multikey", "prose", "code", "agree")
RETRIEVAL_TASKS = ("passkey", "multikey")
STREAM_TASKS = ("prose", "code")


def split_articles(text: str) -> tuple[list[str], list[str]]:
    """Split a WikiText-style text into ``(dev, eval)`` article lists.

    An article runs from its heading line to the next heading; it is EVAL when its heading starts at character
    ``>= len(text) // 2``, DEV otherwise (so the article straddling the midpoint is DEV). Text before the first
    heading is DEV.

    >>> text = " = A = \\n a a \\n = B = \\n b b b b b b b b b b \\n"
    >>> dev, ev = split_articles(text)
    >>> [a.splitlines()[0] for a in dev], [a.splitlines()[0] for a in ev]
    ([' = A = ', ' = B = '], [])
    >>> dev, ev = split_articles(" = A = \\n aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa \\n = B = \\n b \\n")
    >>> [a.splitlines()[0] for a in ev]
    [' = B = ']
    """
    half = len(text) // 2
    starts = [m.start() for m in _HEADING.finditer(text)]
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    bounds = [*starts, len(text)]
    dev: list[str] = []
    ev: list[str] = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            (ev if a >= half else dev).append(text[a:b])
    return dev, ev


@lru_cache(maxsize=4)
def _read(path: str) -> str:
    return Path(path).read_text(encoding="utf-8")


def eval_prose(path: str | Path | None = None) -> str:
    """The EVAL prose: the second-half articles of the shipped WikiText-2 file (or of ``path``), joined."""
    text = _read(str(path or corpus_path()))
    _, ev = split_articles(text)
    if not ev:
        raise InputError(f"{path or corpus_path()} has no article heading (' = Title = ') in its second half")
    return "".join(ev)


def code_sample_path() -> Path:
    """Path of the shipped EVAL code sample."""
    path = Path(str(resources.files("sinkscope").joinpath("data", "kv", "eval", CODE_SAMPLE)))
    if not path.is_file():
        raise InputError(f"the shipped EVAL code sample is missing from the installed package ({path})")
    return path


def eval_code() -> str:
    """The EVAL code stream's text (a chunk of CPython's ``fractions.py``)."""
    return _read(str(code_sample_path()))


@dataclass(frozen=True)
class Item:
    """One suite item.

    Attributes:
        task: one of `TASKS`.
        ids: the prompt or stream, token ids, ``len(ids) == length``.
        length: requested length in tokens.
        seed: the generator seed (``>= EVAL_SEED_BASE``).
        depth: fraction of the haystack before the asked needle (retrieval), else 0.
        context_len: tokens of context before the question (retrieval) or before the scored part (streams);
            ``length`` for ``agree``. Methods that compress once after a prefill (kvpress) compress these.
        answer: the expected digits (retrieval), else ``""``.
        needle_span: ``(start, end)`` token span of the asked needle in ``ids`` (retrieval), else ``(0, 0)``.
    """

    task: str
    ids: tuple[int, ...]
    length: int
    seed: int
    depth: float = 0.0
    context_len: int = 0
    answer: str = ""
    needle_span: tuple[int, int] = (0, 0)

    @property
    def key(self) -> str:
        """``task/L<length>/d<depth>/s<seed>``: unique within a suite, stable across runs."""
        return f"{self.task}/L{self.length}/d{self.depth:.2f}/s{self.seed}"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("ids")
        d["key"] = self.key
        return d


@dataclass(frozen=True)
class SuiteSpec:
    """What to build: lengths, depths, how many of each item. Validated at construction (one-line errors).

    Attributes:
        lengths: prompt/stream lengths in tokens.
        depths: needle depths of the retrieval prompts (fractions in [0, 1]).
        tasks: which of `TASKS` to build.
        n_keys: entries per multi-key prompt.
        n_streams: prose and code streams per length (each at its own seeded offset).
        n_agree: greedy-agreement prompts per length.
        score_tokens: scored tail of every stream (None: a quarter of the length). Short by default: a method
            that compresses once after the context (kvpress) keeps the tail uncompressed, so a long tail would
            give it more bytes than the budget.
        seed: first seed (>= EVAL_SEED_BASE); item seeds count up from it.
    """

    lengths: tuple[int, ...] = (1024,)
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    tasks: tuple[str, ...] = TASKS
    n_keys: int = 4
    n_streams: int = 1
    n_agree: int = 2
    score_tokens: int | None = 64
    seed: int = EVAL_SEED_BASE

    def __post_init__(self) -> None:
        if not self.lengths or any(n < 128 for n in self.lengths):
            raise InputError(f"lengths must be >= 128 tokens, got {list(self.lengths)}", param="lengths")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise InputError(f"depths must lie in [0, 1], got {list(self.depths)}", param="depths")
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise InputError(f"unknown tasks {bad or '(none)'}; choose from {', '.join(TASKS)}", param="tasks")
        if not 1 <= self.n_keys <= len(KEY_NAMES):
            raise InputError(f"n_keys must be 1..{len(KEY_NAMES)}, got {self.n_keys}")
        if self.seed < EVAL_SEED_BASE:
            raise InputError(f"EVAL seeds start at {EVAL_SEED_BASE} (below is calibration), got {self.seed}",
                             param="seed")
        if self.score_tokens is not None and not 1 <= self.score_tokens < min(self.lengths) // 2:
            raise InputError(f"score_tokens must be in 1..{min(self.lengths) // 2 - 1}, got {self.score_tokens}")

    def scored(self, length: int) -> int:
        return self.score_tokens or length // 4


@dataclass
class Suite:
    """The built items, in a fixed order (by length, then task, depth, seed)."""

    spec: SuiteSpec
    items: list[Item] = field(default_factory=list)

    def by_task(self, task: str) -> list[Item]:
        return [it for it in self.items if it.task == task]

    def to_json(self) -> dict[str, Any]:
        return {"spec": asdict(self.spec), "items": [it.to_json() for it in self.items]}


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _key(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


def _window(tokens: list[int], n: int, rng: random.Random, what: str) -> list[int]:
    """``n`` consecutive tokens at a seeded offset."""
    if n < 16:
        raise InputError(f"the prompt's fixed text leaves {n} tokens of {what}: ask for a longer length",
                         param="lengths")
    if len(tokens) < n:
        raise InputError(f"the EVAL {what} has {len(tokens)} tokens, fewer than the {n} requested")
    start = rng.randint(0, len(tokens) - n)
    return tokens[start:start + n]


def _insert(hay: list[int], needles: list[tuple[float, list[int]]], boundaries: frozenset[int] = frozenset(),
            reach: int = 48) -> tuple[list[int], list[tuple[int, int]]]:
    """Insert needles (``(depth, ids)``, depth = fraction of ``hay`` before the needle) into ``hay``; returns the
    ids and each needle's span, in the order given.

    A needle goes after the sentence end (a token in ``boundaries``) nearest to its depth, within ``reach`` tokens,
    else exactly at its depth.
    """
    order = sorted(range(len(needles)), key=lambda i: needles[i][0])
    out: list[int] = []
    spans: dict[int, tuple[int, int]] = {}
    pos = 0
    for i in order:
        depth, ids = needles[i]
        target = max(pos, min(len(hay), round(depth * len(hay))))
        ends = [p for p in range(max(pos, target - reach), min(len(hay), target + reach) + 1)
                if p > 0 and hay[p - 1] in boundaries]
        cut = min(ends, key=lambda p: (abs(p - target), p)) if ends else target
        out += hay[pos:cut]
        spans[i] = (len(out), len(out) + len(ids))
        out += ids
        pos = cut
    out += hay[pos:]
    return out, [spans[i] for i in range(len(needles))]


def build_suite(tokenizer: Any, spec: SuiteSpec | None = None, *, prose: str | None = None,
                code: str | None = None, split: str = "eval") -> Suite:
    """Build the EVAL suite for ``tokenizer`` (or, with ``split="dev"``, the same tasks on DEV data).

    Args:
        tokenizer: a Hugging Face tokenizer (no special tokens are added; the model sees plain text).
        spec: what to build (default `SuiteSpec()`).
        prose, code: override the texts (tests); default `eval_prose()` and `eval_code()` (``split="dev"``:
            the calibration data, `sinkscope.kv.calibration_data.dev_prose` / ``dev_code``).
        split: ``"eval"``, or ``"dev"`` for tuning and diagnosis on calibration data (`sinkscope.kv.ablate`):
            DEV texts, and item seeds ``spec.seed - EVAL_SEED_BASE`` on (below ``EVAL_SEED_BASE``, as calibration's).

    Returns:
        A `Suite`; every item's ``ids`` has exactly its ``length`` tokens.
    """
    spec = spec or SuiteSpec()
    if split not in ("eval", "dev"):
        raise InputError(f"split must be 'eval' or 'dev', got {split!r}", param="split")
    if split == "dev":
        from sinkscope.kv.calibration_data import dev_code, dev_prose

        prose = prose if prose is not None else dev_prose()
        code = code if code is not None else (dev_code() if "code" in spec.tasks else "")
    hay_all = _encode(tokenizer, prose if prose is not None else eval_prose())
    code_all = _encode(tokenizer, code if code is not None else eval_code()) if "code" in spec.tasks else []
    # sentence ends of the haystack (WikiText writes " . "): needles go right after one
    boundaries = frozenset(i for t in (" .", ".") for i in _encode(tokenizer, t)[-1:])
    items: list[Item] = []
    seed = spec.seed - (EVAL_SEED_BASE if split == "dev" else 0)
    for length in spec.lengths:
        for task in spec.tasks:
            if task == "passkey":
                q = _encode(tokenizer, PASSKEY_QUESTION)
                pre = _encode(tokenizer, PASSKEY_PREFIX)
                for depth in spec.depths:
                    rng = random.Random(seed)
                    key = _key(rng)
                    needle = _encode(tokenizer, PASSKEY_NEEDLE.format(key=key))
                    hay = _window(hay_all, length - len(pre) - len(needle) - len(q), rng, "prose")
                    ids, ((s, e),) = _insert(hay, [(depth, needle)], boundaries)
                    items.append(Item("passkey", tuple(pre + ids + q), length, seed, depth, len(pre) + len(ids), key,
                                      (len(pre) + s, len(pre) + e)))
                    seed += 1
            elif task == "multikey":
                for depth in spec.depths:
                    rng = random.Random(seed)
                    names = rng.sample(KEY_NAMES, spec.n_keys)
                    keys = [_key(rng) for _ in names]
                    # the asked entry at `depth`, the distractors spread evenly over the rest
                    others = [(i + 0.5) / (spec.n_keys - 1) for i in range(spec.n_keys - 1)]
                    depths = [depth, *others]
                    needles = [_encode(tokenizer, MULTIKEY_NEEDLE.format(name=n, key=k)) for n, k in zip(names, keys)]
                    q = _encode(tokenizer, MULTIKEY_QUESTION.format(name=names[0]))
                    pre = _encode(tokenizer, MULTIKEY_PREFIX)
                    hay = _window(hay_all, length - len(pre) - sum(map(len, needles)) - len(q), rng, "prose")
                    ids, spans = _insert(hay, list(zip(depths, needles)), boundaries)
                    s, e = spans[0]
                    items.append(Item("multikey", tuple(pre + ids + q), length, seed, depth, len(pre) + len(ids),
                                      keys[0], (len(pre) + s, len(pre) + e)))
                    seed += 1
            elif task in STREAM_TASKS:
                source = hay_all if task == "prose" else code_all
                for _ in range(spec.n_streams):
                    ids = _window(source, length, random.Random(seed), task)
                    items.append(Item(task, tuple(ids), length, seed, context_len=length - spec.scored(length)))
                    seed += 1
            elif task == "agree":
                for _ in range(spec.n_agree):
                    ids = _window(hay_all, length, random.Random(seed), "prose")
                    items.append(Item("agree", tuple(ids), length, seed, context_len=length))
                    seed += 1
    return Suite(spec, items)


_NUMBER = re.compile(r"\d+")


def answer_correct(continuation: str, answer: str) -> bool:
    """Whether the first number in a greedy continuation is ``answer``.

    >>> answer_correct(" 12345. Remember", "12345"), answer_correct(" 1234 5", "12345"), answer_correct("no", "1")
    (True, False, False)
    """
    m = _NUMBER.search(continuation)
    return m is not None and m.group() == answer
