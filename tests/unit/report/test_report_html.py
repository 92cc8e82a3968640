"""HTML assembly of the report: escaping, sortable tables, embedded figures, failed sections, no external URLs."""

from __future__ import annotations

import base64
import re

import matplotlib.pyplot as plt

from sinkscope.report.html import Section, format_value, render_page, table_html


def test_table_escapes_and_carries_sort_keys() -> None:
    rows = [{"name": "<script>alert(1)</script>", "x": 2.5, "n": 10}, {"name": "b&c", "x": float("nan"), "n": 9}]
    html = table_html(rows, caption="t")
    assert "<script>" not in html and "&lt;script&gt;" in html and "b&amp;c" in html
    assert 'data-v="2.5"' in html and 'data-v="-1e308"' in html  # NaN sorts last-ascending, shown as a dash
    assert "\u2013" in html and 'class="sortable"' in html
    assert html.count("<tr>") == 3


def test_table_max_rows_says_how_many_were_left() -> None:
    rows = [{"i": i} for i in range(30)]
    html = table_html(rows, max_rows=5)
    assert html.count("<tr>") == 6 and "Showing 5 of 30 rows" in html
    assert "no rows" in table_html([], caption="empty")


def test_format_value() -> None:
    assert format_value(25144.41) == "2.51e+04"
    assert format_value(0.23456) == "0.235"
    assert format_value(None) == "\u2013" and format_value(float("inf")) == "\u2013"
    assert format_value("x") == "x" and format_value(3) == "3"


def test_page_embeds_figures_and_renders_a_failed_section_beside_ok_ones() -> None:
    ok = Section("a", "Section A")
    ok.text("hello <world>")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    ok.figure(fig, "a line")
    ok.explain("numbers say so")
    ok.table([{"k": 1}], csv="a.csv")
    bad = Section("b", "Section B", error="ValueError: boom", details="Traceback ...\nValueError: boom")
    page = render_page("T", [ok, bad], subtitle="sub")
    assert ok.tables == {"a.csv": [{"k": 1}]}
    m = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert m and base64.b64decode(m.group(1))[:4] == b"\x89PNG"
    assert 'id="a" class="report-section ok"' in page and 'id="b" class="report-section failed"' in page
    assert "This section failed:</strong> ValueError: boom" in page and "hello &lt;world&gt;" in page
    assert "What this means" in page and "numbers say so" in page
    assert "Section B (failed)" in page  # the table of contents flags it
    # self-contained: no external resource of any kind
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<link rel=\"stylesheet\"" not in page
    assert not plt.fignum_exists(fig.number)  # the embedded figure was closed
