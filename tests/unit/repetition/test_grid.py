"""The one divergence grid: run in equal-length batches, resumed after an interruption mid-line, keyed by the
settings that change an answer, locked, and summarised against the unpatched model."""

from __future__ import annotations

from pathlib import Path

import pytest

from sinkscope.errors import InputError
from sinkscope.interventions.patch import RepetitionGate, SinkPatch
from sinkscope.repetition.grid import CELLS_FILE, NO_PATCH, GridPlan, read_cells, run_grid, summarise_cells


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_plan_validation_is_one_line(tiny_tok):
    with pytest.raises(InputError, match="at least one non-empty word"):
        GridPlan([], ["instruct"], [4])
    with pytest.raises(InputError, match="batch-size"):
        GridPlan(["cat"], ["instruct"], [4], batch_size=0)
    with pytest.raises(InputError, match="max-new-tokens"):
        GridPlan(["cat"], ["instruct"], [4], max_new_tokens=0)
    with pytest.raises(InputError, match="tokens"):
        GridPlan(["cat dog"], ["instruct"], [4]).validate(tiny_tok, 64)
    with pytest.raises(InputError, match="context"):
        GridPlan(["cat"], ["instruct"], [4096]).validate(tiny_tok, 64)
    with pytest.raises(InputError, match="unknown prompt form"):
        GridPlan(["cat"], ["sonnet"], [4])


def test_grid_batches_equal_lengths_resumes_and_summarises(tiny_llama, tiny_tok, tmp_path: Path):
    patch = SinkPatch([], "x", gate=RepetitionGate(4, 0.9), attention_dedup=True)
    plan = GridPlan(["cat", "dog", "poem", "book", "tree"], ["instruct", "bare", "repeat-colon"], [6, 12],
                    [NO_PATCH, "dedup"], max_new_tokens=5, batch_size=4)
    seen: list[tuple[int, str]] = []
    cells = run_grid(tiny_llama, tiny_tok, plan, {NO_PATCH: None, "dedup": patch}, tmp_path,
                     progress=lambda d, t, what: seen.append((d, what))).cells
    assert len(cells) == plan.n_cells == 60 and seen[-1] == (60, "done")
    # full batches hold rows of one length; the remainders of the length groups are pooled (the tiny tokenizer
    # gives every word the same prompt length: 3 forms x 2 N = 6 groups of 5 per variant)
    whats = [w for _, w in seen[:-1]]
    assert len(whats) == 2 * (6 + 2) and all(w.endswith(f"rows of {w.split()[-2]} tokens") for w in whats[:6])
    assert sum(w.split(": ")[1].startswith("4 rows of") for w in whats) == 2 * (6 + 1)
    assert {c["batch_rows"] for c in cells} == {4, 2}
    # batched answers equal one row at a time
    from sinkscope.models.generate import greedy_continue
    from sinkscope.repetition.prompts import build_prompt

    one = greedy_continue(tiny_llama, [build_prompt(tiny_tok, "poem", 12, "bare").ids], max_new_tokens=5,
                          batch_size=1)[0]
    cell = next(c for c in cells if (c["variant"], c["form"], c["n"], c["word"]) == (NO_PATCH, "bare", 12, "poem"))
    assert cell["continuation"] == tiny_tok.decode(one, skip_special_tokens=True)
    # an interruption mid-line: the partial cell is dropped and redone, the others are kept
    p = tmp_path / CELLS_FILE
    lines = p.read_text().splitlines(keepends=True)
    p.write_text("".join(lines[:37]) + lines[37][:25])
    assert len(read_cells(tmp_path)) == 37
    seen.clear()
    again = run_grid(tiny_llama, tiny_tok, plan, {NO_PATCH: None, "dedup": patch}, tmp_path,
                     progress=lambda d, t, what: seen.append((d, what))).cells
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
        run_grid(tiny_llama, tiny_tok, GridPlan(["cat"], ["bare"], [4], ["other"]), {NO_PATCH: None}, tmp_path)


def test_answers_are_keyed_by_the_settings_that_change_them(tiny_llama, tiny_tok, tmp_path: Path):
    """Another answer length or another patch under the same variant name is refused in one line; the old
    answers stay; an older directory of another judge (no plan.json, cells without a verdict) is refused."""
    import json

    from sinkscope.repetition.grid import PLAN_FILE, answer_settings

    a = SinkPatch([], "x", gate=RepetitionGate(4, 0.9), attention_dedup=True)
    b = SinkPatch([], "x", gate=RepetitionGate(6, 0.9), attention_dedup=True)

    def run(patch, new_tokens):
        plan = GridPlan(["cat"], ["bare"], [6], [NO_PATCH, "p"], max_new_tokens=new_tokens, batch_size=2)
        settings = answer_settings(model="tiny", dtype="float32", revision=None, max_new_tokens=new_tokens,
                                   patches={NO_PATCH: None, "p": patch})
        return run_grid(tiny_llama, tiny_tok, plan, {NO_PATCH: None, "p": patch}, tmp_path, settings=settings)

    first = run(a, 3)
    assert json.loads((tmp_path / PLAN_FILE).read_text())["settings"]["max_new_tokens"] == 3
    before = (tmp_path / CELLS_FILE).read_text()
    with pytest.raises(InputError, match="max_new_tokens=3, this run asks max_new_tokens=4"):
        run(a, 4)
    with pytest.raises(InputError, match="different patch named 'p'"):
        run(b, 3)
    assert (tmp_path / CELLS_FILE).read_text() == before
    assert run(a, 3).cells == first.cells  # the same settings resume: nothing redone
    old = tmp_path / "old"
    old.mkdir()
    (old / CELLS_FILE).write_text(json.dumps({"word": "cat", "n": 6, "form": "bare", "variant": NO_PATCH,
                                              "diverged": True}) + "\n")
    with pytest.raises(InputError, match="older `repeat scan`"):
        run_grid(tiny_llama, tiny_tok, GridPlan(["cat"], ["bare"], [6], max_new_tokens=3), {NO_PATCH: None}, old)


@pytest.mark.parametrize("cells, summary", [
    (["repeat_eval_cpu/headline/cells.jsonl"], "repeat_eval_cpu/headline/summary.csv"),
    (["repeat_eval_cpu/paper/cells.jsonl"], "repeat_eval_cpu/paper/summary.csv"),
    (["repeat_grid_h100/cells.jsonl.gz", "repeat_grid_h100/cells_cpu_completion.jsonl"],
     "repeat_grid_h100/summary.csv"),
])
def test_summary_of_the_committed_answers_is_the_committed_summary(cells, summary):
    """The grid's summary of the published answers (docs/results) is the published summary, row for row."""
    import csv
    import gzip
    import json
    import math

    from sinkscope.repetition.grid import flat_rows

    root = Path(__file__).resolve().parents[3] / "docs" / "results"
    by_key: dict[tuple, dict] = {}
    for name in cells:
        p = root / name
        text = gzip.open(p, "rt").read() if name.endswith(".gz") else p.read_text()
        for c in (json.loads(line) for line in text.splitlines() if line.strip()):
            by_key[(c["variant"], c["form"], c["n"], c["word"])] = c  # the CPU completion replaces nothing
    want = list(csv.DictReader((root / summary).open()))
    got = flat_rows(summarise_cells(list(by_key.values())))
    assert len(got) == len(want)
    for w, g in zip(want, got):
        for k, v in w.items():
            if v in ("", "nan"):
                assert g[k] == "" or math.isnan(g[k]), (k, w, g)
            else:
                assert str(g[k]) == v or float(g[k]) == pytest.approx(float(v), abs=1e-12), (k, w, g)
