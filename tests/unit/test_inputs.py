"""Token inputs: BOS policies, repeated runs built from one id, random tokens, bad input."""

from __future__ import annotations

import pytest

from sinkscope.errors import InputError
from sinkscope.inputs import file_inputs, random_inputs, repeat_inputs, single_token_id, text_inputs
from sinkscope.models.random_hf import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_bos_policies(tok) -> None:
    auto = text_inputs(tok, ["the cat is red ."])
    always = text_inputs(tok, ["the cat is red ."], bos="always")
    assert not auto.bos_prepended and auto.sequences[0][0] != tok.bos_token_id
    assert always.bos_prepended and always.sequences[0] == [tok.bos_token_id, *auto.sequences[0]]
    never = text_inputs(tok, ["<s> the cat"], bos="never")
    assert never.sequences[0][0] != tok.bos_token_id and not never.bos_prepended
    with pytest.raises(InputError, match="BOS policy"):
        text_inputs(tok, ["the"], bos="sometimes")


def test_repeat_is_one_id_times_n(tok) -> None:
    b = repeat_inputs(tok, "poem", 7)
    tid = single_token_id(tok, "poem")
    assert b.sequences == [[tid] * 7] and b.meta["times"] == 7
    assert repeat_inputs(tok, "poem", 3, bos="always").sequences == [[tok.bos_token_id, tid, tid, tid]]
    with pytest.raises(InputError, match="positive"):
        repeat_inputs(tok, "poem", 0)
    with pytest.raises(InputError, match="2 tokens"):
        single_token_id(tok, "the cat")


def test_random_inputs_are_seeded_and_skip_specials(tok) -> None:
    a = random_inputs(tok, 50, 3, seed=1)
    assert a.sequences == random_inputs(tok, 50, 3, seed=1).sequences
    assert a.sequences != random_inputs(tok, 50, 3, seed=2).sequences
    flat = {t for s in a.sequences for t in s}
    assert not flat & set(tok.all_special_ids)
    with pytest.raises(InputError):
        random_inputs(tok, 0, 1)


def test_empty_and_missing_inputs(tok, tmp_path) -> None:
    with pytest.raises(InputError, match="empty text"):
        text_inputs(tok, ["   "])
    with pytest.raises(InputError, match="not found"):
        file_inputs(tok, tmp_path / "nope.txt")
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(InputError, match="empty"):
        file_inputs(tok, tmp_path / "e.txt")
    (tmp_path / "t.txt").write_text("the cat is red . " * 20)
    chunks = file_inputs(tok, tmp_path / "t.txt", max_tokens=10, samples=3)
    assert chunks.lengths == [10, 10, 10]


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not text"),
    (b"caf\xe9 au lait", "not UTF-8 text"),
    (b"  \n\t", "empty"),
])
def test_non_text_files_are_refused(tmp_path, content, message) -> None:
    from sinkscope.errors import InputError
    from sinkscope.io import read_text_file

    f = tmp_path / "input.bin"
    f.write_bytes(content)
    with pytest.raises(InputError, match=message) as e:
        read_text_file(f)
    assert "\n" not in str(e.value)


def test_a_single_str_is_one_text_and_other_types_are_refused(tok) -> None:
    one = text_inputs(tok, "the cat sat")
    assert one.sequences == text_inputs(tok, ["the cat sat"]).sequences and len(one.sequences) == 1
    with pytest.raises(InputError, match="texts must be a str or a list of str, got int"):
        text_inputs(tok, 5)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="texts must be a str or a list of str"):
        text_inputs(tok, ["the cat", 3])  # type: ignore[list-item]


def test_input_spec_is_checked_before_a_tokenizer_exists(tmp_path) -> None:
    from sinkscope.inputs import InputSpec

    with pytest.raises(InputError, match="exactly one input"):
        InputSpec()
    with pytest.raises(InputError, match="is a directory, not a file"):
        InputSpec(file=str(tmp_path))
    with pytest.raises(InputError, match="--repeat WORD needs --times N"):
        InputSpec(repeat="poem")
    with pytest.raises(InputError, match="samples must be a positive integer"):
        InputSpec(random=4, samples=0)
