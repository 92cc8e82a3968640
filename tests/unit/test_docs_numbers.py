"""Every marked table and quoted number in README.md and docs/*.md equals what its committed results give.

The renderers live in ``tools/docs_tables.py`` (a docs tool, outside the package); ``python tools/docs_tables.py
--write`` rewrites the tables after a re-run. The second half checks the check: on altered copies of the docs
(a digit of a table cell, a quoted number, a results file) it must report the difference, so it cannot pass
vacuously.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_tool():
    spec = importlib.util.spec_from_file_location("docs_tables", ROOT / "tools" / "docs_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


dt = _load_tool()

#: tables that must be marked (so deleting a marker cannot silently drop a table from the check)
EXPECTED_TABLES = {
    "README.md": {"scan-lengths", "scan-example", "report-last-line"},
    "docs/report.md": {"report-time"},
    "docs/training.md": {"training-backed"},
}


def test_docs_tables_and_quotes_match_results():
    problems = dt.check_all()
    assert not problems, "\n".join(problems) + "\n(after a re-run: python tools/docs_tables.py --write)"


def test_expected_tables_are_marked():
    texts = dt.read_docs()
    for doc, names in EXPECTED_TABLES.items():
        marked = {m["name"] for m in dt.MARKER.finditer(texts[doc])}
        assert names <= marked, f"{doc}: tables without markers: {sorted(names - marked)}"


def test_every_results_folder_names_its_command():
    sources = {m["source"] for text in dt.read_docs().values() for m in dt.MARKER.finditer(text)}
    assert sources
    for source in sources:
        path = ROOT / source.split("#")[0]
        if path.is_file() and path.suffix == ".json" and "command" in json.loads(path.read_text()):
            continue  # a benchmark's JSON names its command itself
        folder = path if path.is_dir() else path.parent
        sidecars = [folder / "command.json"] if (folder / "command.json").is_file() else \
            sorted(folder.glob("*/command.json"))
        assert sidecars, f"{source}: no command.json saying which command made it"
        for sidecar in sidecars:
            assert json.loads(sidecar.read_text())["command"].strip(), sidecar


def _alter_first_table_digit(text: str) -> str:
    """Change one digit inside the first marked table's body (9 -> 0, else +1)."""
    m = next(dt.MARKER.finditer(text))
    body = m["body"]
    i = next(i for i, ch in enumerate(body) if ch.isdigit() and i > body.index("\n"))  # past the header line
    new = "0" if body[i] == "9" else str(int(body[i]) + 1)
    return text[:m.start("body") + i] + new + text[m.start("body") + i + 1:]


@pytest.mark.parametrize("doc", ["README.md", "docs/report.md"])
def test_check_fails_on_an_altered_table(doc, tmp_path):
    texts = dt.read_docs()
    altered = _alter_first_table_digit(texts[doc])
    assert altered != texts[doc]
    copy = tmp_path / Path(doc).name
    copy.write_text(altered)
    problems = dt.check_text(str(copy), copy.read_text())
    assert len(problems) == 1 and "differs from its results" in problems[0]
    # --write's renderer puts the results' numbers back
    assert dt.render_text(altered) == texts[doc]


def test_check_fails_on_an_altered_quote():
    texts = dt.read_docs()
    q = dt.QUOTES[0]
    text = dt.flat(texts[q.doc])
    m = re.search(q.pattern, text)
    altered = text[:m.start(1)] + m[1] + "7" + text[m.end(1):]
    problems = dt.check_quotes({**texts, q.doc: altered}, quotes=[q])
    assert len(problems) == 1 and "the docs say" in problems[0]
    # a quote that no longer matches is a problem too, not a pass
    problems = dt.check_quotes({**texts, q.doc: text.replace(m[0], "")}, quotes=[q])
    assert len(problems) == 1 and "matched 0 times" in problems[0]


def test_check_fails_when_a_results_file_changes(tmp_path):
    """The same docs against a copy of the results with one number changed: the check must see it."""
    src = ROOT / "docs/results/scan/T64/profile.json"
    root = tmp_path / "repo"
    dest = root / "docs/results/scan"
    shutil.copytree(ROOT / "docs/results/scan", dest)
    data = json.loads(src.read_text())
    data["sink_ratio"] += 0.01
    (dest / "T64/profile.json").write_text(json.dumps(data))
    text = dt.read_docs()["README.md"]
    problems = [p for p in dt.check_text("README.md", text, root) if "scan-lengths" in p]
    assert len(problems) == 1 and "differs from its results" in problems[0]


def test_check_fails_on_an_altered_located_table():
    """Tables checked where they stand (no markers): a changed count in the repetition grid is seen, and a table
    that is no longer there is reported, not skipped."""
    texts = dt.read_docs()
    docs, name, source = dt.LOCATED_TABLES[0]
    header = dt.RENDERERS[name](ROOT / source).splitlines()[0]
    table = dt.located_table(texts[docs[0]], header)
    altered_table = table.replace("| instruct | 1024 | 39 (63%)", "| instruct | 1024 | 38 (63%)")
    assert altered_table != table
    problems = dt.check_located({**texts, docs[0]: texts[docs[0]].replace(table, altered_table)},
                                tables=[dt.LOCATED_TABLES[0]])
    assert len(problems) == 1 and "differs from its results" in problems[0]
    problems = dt.check_located({**texts, docs[0]: texts[docs[0]].replace(table, "")}, tables=[dt.LOCATED_TABLES[0]])
    assert len(problems) == 1 and "not found" in problems[0]


def test_check_fails_on_an_altered_training_row():
    """A committed run's row in docs/training.md that differs from its metrics (one digit of the eval loss) is
    reported; so is a run whose row is missing."""
    texts = dt.read_docs()
    text = texts[dt.TRAINING_DOC]
    line = next(x for x in text.splitlines() if x.startswith("| bb-softmax-adam | softmax |"))
    cells = line.split(" | ")
    cells[4] = cells[4][:-1] + ("0" if cells[4][-1] == "9" else str(int(cells[4][-1]) + 1))
    altered = text.replace(line, " | ".join(cells))
    problems = dt.check_training_rows({**texts, dt.TRAINING_DOC: altered})
    assert len(problems) == 1 and "bb-softmax-adam (final row) differs" in problems[0]
    problems = dt.check_training_rows({**texts, dt.TRAINING_DOC: text.replace(line + "\n", "")})
    assert len(problems) == 1 and "no row for bb-softmax-adam (final row)" in problems[0]
