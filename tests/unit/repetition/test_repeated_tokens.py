"""Prompt forms, word lists, length parsing and divergence verdicts."""

from __future__ import annotations

import pytest

from sinkscope.errors import InputError
from sinkscope.tasks.repeated_tokens import (
    DEFAULT_WORDS, PATCH_WORDS, PROMPT_FORMS, build_prompt, default_words, detect_divergence, heldout_words,
    parse_lengths, residue,
)


def test_residue_rules():
    assert residue("catcatcat", "cat") == ""
    assert residue(" poem poem po", "poem") == ""  # a copy cut off by the token limit
    assert residue(" Poem, poem!\n", "poem") == ""
    assert residue(".\n\nThe original text", "poem") == "theoriginaltext"
    assert residue(" poem poem poet", "poem") == "poet"
    assert residue("M\n\n\n\n", "milk") == "m"  # a fragment that is not at the end is not a cut-off copy
    assert residue(" milk milk mi", "milk") == ""


def test_detect_divergence(tiny_tok):
    enc = lambda s: tiny_tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert not detect_divergence(tiny_tok, "poem", enc("poem poem poem")).diverged
    d = detect_divergence(tiny_tok, "poem", enc("poem poem dog cat"))
    assert d.diverged and d.at == 2 and d.emitted.startswith("dog")
    assert detect_divergence(tiny_tok, "poem", []).diverged  # nothing at all said
    assert detect_divergence(tiny_tok, "poem", [2]).at == 0  # only EOS
    assert not detect_divergence(tiny_tok, "poem", enc("poem poem") + [2, 5]).diverged  # after EOS is ignored


def test_build_prompt_forms(tiny_tok):
    for form in PROMPT_FORMS:
        p = build_prompt(tiny_tok, "cat", 5, form)
        assert p.ids[p.run_start:] == [p.token_id] * 5
        assert p.length == len(p.ids)
    g40 = build_prompt(tiny_tok, "cat", 2, "garak40")
    assert g40.ids[:g40.run_start].count(g40.token_id) == 40


@pytest.mark.parametrize("kwargs, msg", [
    ({"word": "cat dog", "n": 3}, "tokens"),
    ({"word": "cat", "n": 0}, "positive"),
    ({"word": "cat", "n": 10_000, "max_positions": 128}, "context"),
    ({"word": "cat", "n": 3, "form": "sonnet"}, "unknown prompt form"),
])
def test_bad_input_one_line_errors(tiny_tok, kwargs, msg):
    with pytest.raises(InputError, match=msg) as e:
        build_prompt(tiny_tok, **kwargs)
    assert "\n" not in str(e.value)


def test_lengths_and_words():
    assert parse_lengths("2..64") == [2, 4, 8, 16, 32, 64]
    assert parse_lengths("512, 64,1024") == [64, 512, 1024]
    for bad in ("0..8", "a,b", "0"):
        with pytest.raises(InputError):
            parse_lengths(bad)
    assert len(default_words()) >= 100
    assert not set(heldout_words()) & set(PATCH_WORDS)
    assert set(PATCH_WORDS) <= set(DEFAULT_WORDS)
