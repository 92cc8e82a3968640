"""Prompt forms, word lists, length parsing and batching."""

from __future__ import annotations

import pytest

from sinkscope.errors import InputError
from sinkscope.repetition.prompts import PROMPT_FORMS, build_prompt, equal_length_batches, parse_lengths
from sinkscope.repetition.words import DEFAULT_WORDS, PATCH_WORDS, default_words, heldout_words


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


def test_repeat_colon_form_is_plain_text_then_the_run(tiny_tok):
    p = build_prompt(tiny_tok, "dog", 3, "repeat-colon")
    assert tiny_tok.decode(p.ids[:p.run_start]).replace(" ", "") in ("Repeat:", "<s>Repeat:")
    assert p.ids[p.run_start:] == [p.token_id] * 3


def test_batches_refuse_a_zero_batch_size(tiny_tok):
    prompts = [build_prompt(tiny_tok, w, 3, "bare") for w in ("cat", "dog", "poem")]
    assert [len(b) for b in equal_length_batches(prompts, 2)] == [2, 1]
    with pytest.raises(InputError, match="batch size"):
        equal_length_batches(prompts, 0)
