"""The word sets of the protocol (issue 13): development, evaluation and spare words never overlap, and every
evaluation and spare word is one token (with a leading space, the run token) for SmolLM2's tokenizer."""

from __future__ import annotations

import pytest

from sinkscope.repetition.words import (
    _CANDIDATES,
    DEFAULT_WORDS,
    DEV_WORDS,
    EVAL_WORDS,
    PATCH_WORDS,
    SPARE_WORDS,
    WORD_SETS,
    WordChoice,
    run_token_id,
    word_set,
)


def test_dev_eval_and_spare_are_disjoint():
    dev, ev, spare = set(DEV_WORDS), set(EVAL_WORDS), set(SPARE_WORDS)
    assert not dev & ev and not dev & spare and not ev & spare
    assert len(EVAL_WORDS) == len(ev) == 62 and len(SPARE_WORDS) == len(spare) == 30
    assert ev | spare == set(_CANDIDATES)  # every candidate is in exactly one of the two held-out sets
    assert dev == set(DEFAULT_WORDS) and set(PATCH_WORDS) <= dev
    assert [w for i, w in enumerate(_CANDIDATES) if i % 3 == 2] == list(SPARE_WORDS)  # the rule, in order
    assert WORD_SETS == {"dev": DEV_WORDS, "eval": EVAL_WORDS}  # the spare words are not reachable by name


def test_word_choice_is_checked_before_a_model_loads(tmp_path, tiny_tok):
    from sinkscope.errors import InputError

    (tmp_path / "w.txt").write_text("cat\n# a comment\ndog\n")
    assert WordChoice.from_cli(None, tmp_path / "w.txt").resolve(tiny_tok) == ["cat", "dog"]
    assert WordChoice.from_cli("cat, dog ,poem", None, 2).resolve(tiny_tok) == ["cat", "dog"]
    assert WordChoice.from_cli(None, None, None, "eval").word_set == "eval"
    for args, msg in (((" , ", None), "at least one word"), (("cat", tmp_path / "w.txt"), "not both"),
                      (("cat", None, 0), "--n-words"), ((None, None, None, "spare"), "unknown word set")):
        with pytest.raises(InputError, match=msg):
            WordChoice.from_cli(*args)


@pytest.mark.slow
def test_eval_and_spare_words_are_single_smollm2_tokens():
    from sinkscope.models.load import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    for w in (*EVAL_WORDS, *SPARE_WORDS):
        ids = tok(" " + w, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and run_token_id(tok, w) == ids[0], w
    assert word_set("eval", tok) == list(EVAL_WORDS)
