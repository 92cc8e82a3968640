"""The one divergence judge: verdicts on whole answers (repeats / stopped / diverged), the first divergent token,
loops and distinct trigrams."""

from __future__ import annotations

import pytest

from sinkscope.repetition.judge import distinct_trigrams, is_loop, judge_answer, residue


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_residue_rules():
    assert residue("catcatcat", "cat") == ""
    assert residue(" poem poem po", "poem") == ""  # a copy cut off by the token limit
    assert residue(" Poem, poem!\n", "poem") == ""
    assert residue(".\n\nThe original text", "poem") == "theoriginaltext"
    assert residue(" poem poem poet", "poem") == "poet"
    assert residue("M\n\n\n\n", "milk") == "m"  # a fragment that is not at the end is not a cut-off copy
    assert residue(" milk milk mi", "milk") == ""


def test_first_divergent_token_and_eos(tiny_tok):
    enc = lambda s: tiny_tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert judge_answer(tiny_tok, "poem", enc("poem poem poem")).verdict == "repeats"
    d = judge_answer(tiny_tok, "poem", enc("poem poem dog cat"))
    assert d.diverged and d.at == 2 and d.copies == 2 and d.emitted.startswith("dog")
    after_eos = judge_answer(tiny_tok, "poem", enc("poem poem") + [tiny_tok.eos_token_id] + enc("dog"))
    assert after_eos.verdict == "stopped" and after_eos.new_tokens == 2  # what follows EOS is ignored


def test_an_answer_that_stops_at_once_did_not_diverge(tiny_tok):
    """EOS as the first generated token: the N copies of the prompt, then the end. It said nothing else, so it is
    `stopped` (the published verdicts), not diverged: the one judge of `repeat scan` and `repeat evaluate`."""
    v = judge_answer(tiny_tok, "poem", [tiny_tok.eos_token_id])
    assert (v.verdict, v.diverged, v.at, v.copies, v.new_tokens, v.eos) == ("stopped", False, None, 0, 0, True)
    assert v.distinct3 is None  # no trigram in an empty answer: null in strict JSON, not NaN
    row = v.to_json()
    assert row["diverged"] is False and row["stopped"] is True and row["distinct3"] is None


def test_blank_answer_without_copies_diverged(tiny_tok):
    dots = tiny_tok(".", add_special_tokens=False)["input_ids"]
    v = judge_answer(tiny_tok, "poem", dots * 3)  # short, no EOS, not one copy: it left the repetition at once
    assert v.verdict == "diverged" and v.at == 0


def test_verdicts_on_whole_answers(tiny_tok):
    eos = {tiny_tok.eos_token_id}
    dog = _ids(tiny_tok, "dog")
    v = judge_answer(tiny_tok, "dog", dog * 6, eos)
    assert v.verdict == "repeats" and not v.diverged and v.copies == 6 and not v.eos
    v = judge_answer(tiny_tok, "dog", dog * 3 + [tiny_tok.eos_token_id] + _ids(tiny_tok, "cat"), eos)
    assert v.verdict == "stopped" and v.stopped and v.copies == 3 and v.new_tokens == 3
    v = judge_answer(tiny_tok, "dog", [tiny_tok.eos_token_id], eos)  # N copies in the prompt, then EOS
    assert v.verdict == "stopped" and v.copies == 0
    v = judge_answer(tiny_tok, "dog", dog * 4 + _ids(tiny_tok, "cat tree") + dog * 2, eos)  # late divergence
    assert v.verdict == "diverged" and v.at == 4 and v.copies == 4 and v.emitted.startswith("cat")
    v = judge_answer(tiny_tok, "dog", dog + _ids(tiny_tok, ". .") + dog, eos)  # punctuation between copies
    assert v.verdict == "repeats"
    dots = _ids(tiny_tok, ".")
    v = judge_answer(tiny_tok, "dog", dots * 20, eos)  # only dots up to the limit: it never repeated
    assert v.verdict == "diverged" and v.at == 0
    v = judge_answer(tiny_tok, "dog", dog * 5 + dots * 9, eos)  # copies, then a long tail of dots
    assert v.verdict == "diverged" and v.at == 5 and v.copies == 5
    v = judge_answer(tiny_tok, "dog", dog * 5 + dots * 8, eos)  # a short tail: cut off while repeating
    assert v.verdict == "repeats"
    v = judge_answer(tiny_tok, "dog", dots * 2 + [tiny_tok.eos_token_id], eos)  # a full stop, then EOS
    assert v.verdict == "stopped"


def test_loop_detection():
    assert is_loop([5, 6, 7] * 20) and is_loop([1, 2, 3] + [8, 9] * 30)
    assert not is_loop([4] * 60)  # the repetition itself is not a loop
    assert not is_loop(list(range(60))) and not is_loop([5, 6] * 10)  # too short to judge
    assert distinct_trigrams([1, 2, 3, 1, 2, 3]) == pytest.approx(3 / 4)
    assert distinct_trigrams([1, 2]) is None
