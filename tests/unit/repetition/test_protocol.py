"""The divergence protocol: verdicts on whole answers (repeats / stopped / diverged, loops), the grid run in
equal-length batches, resumed after an interruption mid-line, and the summary against the unpatched model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sinkscope.errors import InputError
from sinkscope.interventions.patch import RepetitionGate, SinkPatch
from sinkscope.repetition.protocol import (
    CELLS_FILE, NO_PATCH, EvalPlan, distinct_trigrams, is_loop, judge_answer, read_cells, run_protocol,
    summarise_cells,
)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_verdicts_on_whole_answers(tiny_tok):
    eos = {tiny_tok.eos_token_id}
    dog = _ids(tiny_tok, "dog")
    v = judge_answer(tiny_tok, "dog", dog * 6, eos)
    assert v["verdict"] == "repeats" and not v["diverged"] and v["copies"] == 6 and not v["eos"]
    v = judge_answer(tiny_tok, "dog", dog * 3 + [tiny_tok.eos_token_id] + _ids(tiny_tok, "cat"), eos)
    assert v["verdict"] == "stopped" and v["stopped"] and v["copies"] == 3 and v["new_tokens"] == 3
    v = judge_answer(tiny_tok, "dog", [tiny_tok.eos_token_id], eos)  # N copies in the prompt, then EOS
    assert v["verdict"] == "stopped" and v["copies"] == 0
    v = judge_answer(tiny_tok, "dog", dog * 4 + _ids(tiny_tok, "cat tree") + dog * 2, eos)  # late divergence
    assert v["verdict"] == "diverged" and v["at"] == 4 and v["copies"] == 4 and v["emitted"].startswith("cat")
    v = judge_answer(tiny_tok, "dog", dog + _ids(tiny_tok, ". .") + dog, eos)  # punctuation between copies
    assert v["verdict"] == "repeats"
    dots = _ids(tiny_tok, ".")
    v = judge_answer(tiny_tok, "dog", dots * 20, eos)  # only dots up to the limit: it never repeated
    assert v["verdict"] == "diverged" and v["at"] == 0
    v = judge_answer(tiny_tok, "dog", dog * 5 + dots * 9, eos)  # copies, then a long tail of dots
    assert v["verdict"] == "diverged" and v["at"] == 5 and v["copies"] == 5
    v = judge_answer(tiny_tok, "dog", dog * 5 + dots * 8, eos)  # a short tail: cut off while repeating
    assert v["verdict"] == "repeats"
    v = judge_answer(tiny_tok, "dog", dots * 2 + [tiny_tok.eos_token_id], eos)  # a full stop, then EOS
    assert v["verdict"] == "stopped"


def test_loop_detection():
    assert is_loop([5, 6, 7] * 20) and is_loop([1, 2, 3] + [8, 9] * 30)
    assert not is_loop([4] * 60)  # the repetition itself is not a loop
    assert not is_loop(list(range(60))) and not is_loop([5, 6] * 10)  # too short to judge
    assert distinct_trigrams([1, 2, 3, 1, 2, 3]) == pytest.approx(3 / 4)


def test_plan_validation_is_one_line(tiny_tok):
    with pytest.raises(InputError, match="no words"):
        EvalPlan([], ["instruct"], [4]).validate(tiny_tok, 64)
    with pytest.raises(InputError, match="tokens"):
        EvalPlan(["cat dog"], ["instruct"], [4]).validate(tiny_tok, 64)
    with pytest.raises(InputError, match="context"):
        EvalPlan(["cat"], ["instruct"], [4096]).validate(tiny_tok, 64)
    with pytest.raises(InputError, match="unknown prompt form"):
        EvalPlan(["cat"], ["sonnet"], [4]).validate(tiny_tok, 64)


def test_grid_batches_equal_lengths_resumes_and_summarises(tiny_llama, tiny_tok, tmp_path: Path):
    patch = SinkPatch([], "x", gate=RepetitionGate(4, 0.9), attention_dedup=True)
    plan = EvalPlan(["cat", "dog", "poem", "book", "tree"], ["instruct", "bare", "repeat-colon"], [6, 12],
                    [NO_PATCH, "dedup"], max_new_tokens=5, batch_size=4)
    seen: list[tuple[int, str]] = []
    cells = run_protocol(tiny_llama, tiny_tok, plan, {NO_PATCH: None, "dedup": patch}, tmp_path,
                         on_progress=lambda d, t, what: seen.append((d, what)))
    assert len(cells) == plan.n_cells == 60 and seen[-1] == (60, "done")
    # full batches hold rows of one length; the remainders of the length groups are pooled (the tiny tokenizer
    # gives every word the same prompt length: 3 forms x 2 N = 6 groups of 5 per variant)
    whats = [w for _, w in seen[:-1]]
    assert len(whats) == 2 * (6 + 2) and all(w.endswith("rows of %s tokens" % w.split()[-2]) for w in whats[:6])
    assert sum(w.split(": ")[1].startswith("4 rows of") for w in whats) == 2 * (6 + 1)
    assert {c["batch_rows"] for c in cells} == {4, 2}
    # batched answers equal one row at a time
    from sinkscope.repetition.generate import greedy_continue
    from sinkscope.tasks.repeated_tokens import build_prompt

    one = greedy_continue(tiny_llama, [build_prompt(tiny_tok, "poem", 12, "bare").ids], max_new_tokens=5,
                          batch_size=1)[0]
    cell = next(c for c in cells if (c["variant"], c["form"], c["n"], c["word"]) == (NO_PATCH, "bare", 12, "poem"))
    assert cell["continuation"] == tiny_tok.decode(one, skip_special_tokens=True)
    # an interruption mid-line: the partial cell is dropped and redone, the others are kept
    p = tmp_path / CELLS_FILE
    lines = p.read_text().splitlines(keepends=True)
    p.write_text("".join(lines[:37]) + lines[37][:25])
    assert len(read_cells(tmp_path)) == 37 and p.read_text().endswith("\n")
    seen.clear()
    again = run_protocol(tiny_llama, tiny_tok, plan, {NO_PATCH: None, "dedup": patch}, tmp_path,
                         on_progress=lambda d, t, what: seen.append((d, what)))
    assert seen[0][0] == 37 and len(read_cells(tmp_path)) == 60
    key = lambda c: (c["variant"], c["form"], c["n"], c["word"])  # noqa: E731
    assert [(key(c), c["verdict"], c["continuation"]) for c in again] == [
        (key(c), c["verdict"], c["continuation"]) for c in cells]
    rows = summarise_cells(again)
    assert len(rows) == 2 * 3 * 2 and rows[0]["variant"] == NO_PATCH
    for r in rows:
        cs = [c for c in again if (c["variant"], c["form"], c["n"]) == (r["variant"], r["form"], r["n"])]
        assert r["diverged"] + r["stopped"] + r["repeats"] == r["words"] == 5
        assert r["rate"] == sum(c["diverged"] for c in cs) / 5
        if r["variant"] == "dedup":
            base = next(b for b in rows if (b["variant"], b["form"], b["n"]) == (NO_PATCH, r["form"], r["n"]))
            assert r["rate_unpatched"] == base["rate"]
    with pytest.raises(InputError, match="unknown variant"):
        run_protocol(tiny_llama, tiny_tok, EvalPlan(["cat"], ["bare"], [4], ["other"]), {NO_PATCH: None}, tmp_path)


@torch.no_grad()
def test_repeat_colon_form_is_plain_text_then_the_run(tiny_tok):
    from sinkscope.tasks.repeated_tokens import build_prompt

    p = build_prompt(tiny_tok, "dog", 3, "repeat-colon")
    assert tiny_tok.decode(p.ids[:p.run_start]).replace(" ", "") in ("Repeat:", "<s>Repeat:")
    assert p.ids[p.run_start:] == [p.token_id] * 3
