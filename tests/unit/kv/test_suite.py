"""The EVAL suite: disjoint from calibration, exact lengths, needles where the generator says they are."""

from __future__ import annotations

import pytest

from sinkscope.corpora import corpus_path
from sinkscope.errors import InputError
from sinkscope.kv.suite import (
    EVAL_SEED_BASE,
    PASSKEY_PREFIX,
    PASSKEY_QUESTION,
    SuiteSpec,
    answer_correct,
    build_suite,
    eval_code,
    eval_prose,
    split_articles,
)

from .conftest import CODE, PROSE


def test_split_of_the_shipped_corpus_is_by_article_start_at_half_the_characters():
    text = corpus_path().read_text(encoding="utf-8")
    dev, ev = split_articles(text)
    assert "".join(dev) + "".join(ev) == text  # a partition, in order
    half = len(text) // 2
    assert len("".join(dev)) < half + max(len(a) for a in dev)  # DEV ends with the article straddling the half
    assert len("".join(dev)) >= half or not ev[0]
    starts = len("".join(dev))
    assert starts >= half and ev[0].startswith(" = ") and ev[0].splitlines()[0].endswith(" = ")
    titles_dev = {a.splitlines()[0] for a in dev if a.startswith(" = ")}
    titles_ev = [a.splitlines()[0] for a in ev]
    assert len(ev) >= 20 and not (set(titles_ev) & titles_dev - {" = <unk> = ", " = <unk> <unk> = "})
    assert eval_prose() == "".join(ev)


def test_code_sample_is_shipped_and_is_not_empty_python():
    code = eval_code()
    assert "class Fraction" in code and len(code) > 10_000


@pytest.mark.parametrize("length", [600, 917])
def test_passkey_prompt_length_needle_position_and_key(char_tokenizer, length):
    spec = SuiteSpec(lengths=(length,), depths=(0.0, 0.25, 0.5, 0.9, 1.0), tasks=("passkey",))
    suite = build_suite(char_tokenizer, spec, prose=PROSE, code=CODE)
    items = suite.by_task("passkey")
    assert len(items) == 5
    q, pre = len(PASSKEY_QUESTION), len(PASSKEY_PREFIX)
    for it in items:
        assert len(it.ids) == length and it.length == length
        assert it.seed >= EVAL_SEED_BASE
        text = char_tokenizer.decode(it.ids)
        assert text.endswith("What is the pass key? The pass key is")
        assert text.startswith("There is an important info hidden")
        s, e = it.needle_span
        needle = char_tokenizer.decode(it.ids[s:e])
        assert needle == f" The pass key is {it.answer}. Remember it. {it.answer} is the pass key."
        assert len(it.answer) == 5 and it.answer.isdigit()
        assert text.count(it.answer) == 2  # only the needle holds the key (the haystack has no digits)
        hay = length - pre - (e - s) - q
        # the needle sits after the sentence end nearest its depth (the prose has one every ~45 characters)
        assert abs(s - pre - it.depth * hay) <= 48  # within the reach of the search for a sentence end
        assert text[s - 1] == "." or s == pre or e == length - q
        assert it.context_len == length - q
    assert len({it.answer for it in items}) == 5  # seeded, different keys


def test_multikey_prompt_asks_one_entry_among_distractors(char_tokenizer):
    spec = SuiteSpec(lengths=(400,), depths=(0.2, 0.8), tasks=("multikey",), n_keys=4)
    for it in build_suite(char_tokenizer, spec, prose=PROSE, code=CODE).items:
        text = char_tokenizer.decode(it.ids)
        assert len(it.ids) == 400
        s, e = it.needle_span
        needle = char_tokenizer.decode(it.ids[s:e])
        name = needle.split("key ")[1].split(" is")[0]
        assert needle == f" The value of key {name} is {it.answer}."
        assert text.endswith(f"What is the value of key {name}? The value of key {name} is")
        assert text[:it.context_len].count(" The value of key ") == 4  # three distractors in the context
        assert text.count(it.answer) == 1


def test_streams_and_agreement_prompts(char_tokenizer):
    spec = SuiteSpec(lengths=(256,), tasks=("prose", "code", "agree"), n_streams=2, n_agree=1)
    suite = build_suite(char_tokenizer, spec, prose=PROSE, code=CODE)
    assert [it.task for it in suite.items] == ["prose", "prose", "code", "code", "agree"]
    for it in suite.items:
        assert len(it.ids) == 256
    assert suite.by_task("prose")[0].context_len == 256 - 64  # a quarter scored
    assert "def f" in char_tokenizer.decode(suite.by_task("code")[0].ids)
    assert suite.by_task("prose")[0].ids != suite.by_task("prose")[1].ids  # own seeded offsets
    assert len({it.key for it in suite.items}) == len(suite.items)


def test_same_spec_same_suite_and_keys_name_every_setting(char_tokenizer):
    spec = SuiteSpec(lengths=(400,), depths=(0.5,), tasks=("passkey", "prose"))
    a = build_suite(char_tokenizer, spec, prose=PROSE, code=CODE)
    b = build_suite(char_tokenizer, spec, prose=PROSE, code=CODE)
    assert a.items == b.items
    assert a.items[0].key == "passkey/L400/d0.50/s1000"


@pytest.mark.parametrize("kwargs, param", [({"seed": 999}, "seed"), ({"lengths": (64,)}, "lengths"),
                                           ({"depths": (1.5,)}, "depths"), ({"tasks": ("nope",)}, "tasks")])
def test_bad_spec_is_one_line(kwargs, param):
    with pytest.raises(InputError) as e:
        SuiteSpec(**kwargs)
    assert "\n" not in str(e.value) and e.value.param == param


def test_too_short_text_is_refused(char_tokenizer):
    with pytest.raises(InputError, match="fewer than"):
        build_suite(char_tokenizer, SuiteSpec(lengths=(300,), tasks=("prose",)), prose="short text", code=CODE)


def test_answer_correct_reads_the_first_number():
    assert answer_correct(" 48213. Remember it", "48213")
    assert not answer_correct(" 4821 3", "48213")
    assert not answer_correct(" the key", "48213")
    assert not answer_correct(" 482130", "48213")


@pytest.mark.slow
def test_real_tokenizer_lengths_and_needle():
    from sinkscope.models.load import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    suite = build_suite(tok, SuiteSpec(lengths=(512, 1024), depths=(0.1, 0.9)))
    for it in suite.items:
        assert len(it.ids) == it.length
        if it.answer:
            s, e = it.needle_span
            assert it.answer in tok.decode(list(it.ids[s:e]))
            assert abs(s / it.context_len - it.depth) < 0.1


def test_a_length_too_short_for_the_prompt_text_is_refused(char_tokenizer):
    with pytest.raises(InputError, match="longer length"):
        build_suite(char_tokenizer, SuiteSpec(lengths=(160,), tasks=("passkey",)), prose=PROSE, code=CODE)
