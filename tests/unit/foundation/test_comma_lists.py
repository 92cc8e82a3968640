"""The one comma-list parser: items, numbers, allowed names, and its one-line errors naming the flag."""

from __future__ import annotations

import pytest

from sinkscope.comma_lists import parse_floats, parse_ints, parse_names, split_items
from sinkscope.errors import InputError


def test_items_are_stripped_and_empty_items_dropped() -> None:
    assert split_items(" a, b ,,c,") == ("a", "b", "c")
    assert split_items(" , ") == ()


def test_numbers_keep_order_unless_asked_to_sort() -> None:
    assert parse_floats("0.5, 0.125,0.5", flag="budgets") == (0.5, 0.125, 0.5)
    assert parse_ints("1024,512,1024", flag="lengths", unique_sorted=True) == (512, 1024)
    assert parse_ints("2e3", flag="lengths") == (2000,)
    assert all(isinstance(v, int) for v in parse_ints("3,1", flag="n"))


@pytest.mark.parametrize(("text", "integer", "message"), [
    ("", False, "--budgets: give at least one number"),
    ("0.25,x", False, "--budgets must be a comma list of numbers, got '0.25,x'"),
    ("512,1.5", True, "--budgets must be a comma list of integers, got '512,1.5'"),
    ("nan", False, "--budgets must be a comma list of finite numbers"),
    ("inf", True, "--budgets must be a comma list of finite integers"),
])
def test_bad_numbers_are_one_line_errors_naming_the_flag(text: str, integer: bool, message: str) -> None:
    with pytest.raises(InputError, match="^" + message.replace("(", r"\(")) as e:
        (parse_ints if integer else parse_floats)(text, flag="budgets")
    assert "\n" not in str(e.value)
    assert e.value.param == "budgets"


def test_names_are_checked_against_the_allowed_set() -> None:
    assert parse_names("dense, policy", flag="methods", known=["dense", "uniform", "policy"]) == ("dense", "policy")
    with pytest.raises(InputError, match="^unknown --methods polcy,x; choose from dense,policy$"):
        parse_names("dense,polcy,x", flag="methods", known=["dense", "policy"])
    with pytest.raises(InputError, match="^--repeat-words: give at least one word$") as e:
        parse_names(" , ", flag="repeat-words", empty="give at least one word")
    assert e.value.param == "repeat_words"
