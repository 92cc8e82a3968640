"""The docs' KV evaluation tables are the committed results files, rendered by the functions that render them."""

from __future__ import annotations

from pathlib import Path

import pytest

from sinkscope.kv.evaluate import load_summary, passkey_by_length_markdown, summary_markdown

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "kv_eval.md"
#: results directory -> the function that renders its table in the docs
TABLES = {
    "docs/results/kv/dense_passkey": passkey_by_length_markdown,
    "docs/results/kv/eval_drop_error_policy": summary_markdown,
    "docs/results/kv/eval": summary_markdown,
    "docs/results/kv/peers": summary_markdown,
    "docs/results/kv/needle_policy": summary_markdown,
    "docs/results/kv/eval_ablation_policy": summary_markdown,
    "docs/results/kv/eval_1536": summary_markdown,
    "docs/results/kv/peers_current": summary_markdown,
    "docs/results/kv/peers_1536": summary_markdown,
}


@pytest.mark.parametrize("results, render", list(TABLES.items()))
def test_docs_table_equals_its_results_file(results, render):
    rows = load_summary(ROOT / results)["rows"]
    table = render(rows)
    assert len(table.splitlines()) >= 3, f"{results} has no rows"
    text = DOC.read_text(encoding="utf-8")
    assert f"\n{table}\n" in text, f"docs/kv_eval.md does not hold the table of {results}/summary.json " \
                                   f"(regenerate it with sinkscope.kv.evaluate.{render.__name__})"


def test_the_markdown_of_a_changed_result_is_not_in_the_docs():
    rows = load_summary(ROOT / "docs/results/kv/dense_passkey")["rows"]
    changed = [dict(r, passkey_acc=(r.get("passkey_acc") or 0) + 0.01) for r in rows]
    assert f"\n{passkey_by_length_markdown(changed)}\n" not in DOC.read_text(encoding="utf-8")


def test_docs_ablation_table_equals_its_results_file():
    from sinkscope.kv.ablate import heads_markdown, load_ablation

    table = heads_markdown(load_ablation(ROOT / "docs/results/kv/ablation_25"))
    assert f"\n{table}\n" in DOC.read_text(encoding="utf-8"), \
        "docs/kv_eval.md does not hold the table of docs/results/kv/ablation_25/ablation.json (regenerate it with " \
        "sinkscope.kv.ablate.heads_markdown)"
