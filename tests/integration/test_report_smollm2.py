"""`sinkscope report` on the real SmolLM2 (small inputs), checked in headless Chromium: no console messages,
every section present and rendered, images decoded, the heads table sorts on click."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from sinkscope.cli.__main__ import main
from sinkscope.report.browser import load_page

pytestmark = [pytest.mark.slow, pytest.mark.browser]

SECTIONS = ("model", "sinks", "drains", "dormant", "kv", "repetition")

#: Appended to a copy of the page: checks images and sorts the heads table by 'dependence' (ascending),
#: then records the results as attributes on <body> (read back from the DOM dump).
PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img');
  var ok = Array.prototype.every.call(imgs, function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.setAttribute('data-images', imgs.length + ':' + ok);
  var th = document.querySelector('#dormant-heads_dormancy th[data-col="dependence"]');
  th.click();
  var idx = Array.prototype.indexOf.call(th.parentNode.children, th);
  var vals = Array.prototype.map.call(document.querySelectorAll('#dormant-heads_dormancy tbody tr'),
                                      function (r) { return parseFloat(r.cells[idx].getAttribute('data-v')); });
  var asc = vals.every(function (v, i) { return i === 0 || vals[i - 1] <= v; });
  document.body.setAttribute('data-sorted', vals.length + ':' + asc + ':' + th.getAttribute('aria-sort'));
});
</script>"""


def test_report_page_in_a_real_browser(tmp_path) -> None:
    out = tmp_path / "report"
    rc = main(["report", "--model", "smollm2-135m", "--out", str(out), "--tokens", "24", "--samples", "2",
               "--repeat-words", "poem,book", "--repeat-lengths", "4,16", "--repeat-new-tokens", "4",
               "--circuit-neurons", "0"])
    assert rc == 0
    doc = json.loads((out / "report.json").read_text())
    assert {k: v["status"] for k, v in doc["sections"].items()} == {k: "ok" for k in SECTIONS}
    assert doc["sections"]["sinks"]["data"]["kinds"]["text"]["sink0"] > 0.5  # the first token is a sink
    kv = doc["sections"]["kv"]["data"]
    assert kv["n_heads"] == 30 * 3 and kv["length"] == 512
    kl = [r["kl"] for r in kv["line"]]  # 12.5%, 25%, 50%: more full heads, closer to the dense model
    assert [r["budget"] for r in kv["line"]] == [0.125, 0.25, 0.5] and kl[0] > kl[1] > kl[2] > 0
    # the shipped patch's harm, on the EVAL documents where its gate opens: the committed evaluation's numbers
    harm = doc["sections"]["repetition"]["data"]["harm"]
    assert harm["method"] == "dedup" and harm["set"] == "eval"
    committed = {r["name"]: r for r in csv.DictReader(
        (Path(__file__).parents[2] / "docs/results/repeat_eval_cpu/text/harm_eval_ours_documents.csv").open())}
    assert sorted(harm["gate_opens"]) == sorted(n for n, r in committed.items() if int(r["gate_opened"]) > 0)
    assert len(harm["measured"]) == 6
    for e in harm["effects"]:
        for col in ("kl_all", "kl_inside", "kl_after"):
            assert e[col] == pytest.approx(float(committed[e["name"]][col]), rel=1e-3, abs=1e-7), (e["name"], col)
    page = (out / "index.html").read_text()
    assert not re.search(r'(src|href)="(https?:)?//', page)  # self-contained

    seen = load_page(out / "index.html")
    assert seen.console == [], seen.console
    for key in SECTIONS:
        assert re.search(rf'<section id="{key}" class="report-section ok" data-status="ok">', seen.dom), key
        assert "What this means" in seen.dom.split(f'<section id="{key}"', 1)[1].split("</section>", 1)[0]
    assert "This section failed" not in seen.dom

    probe = out / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    checked = load_page(probe)
    assert checked.console == [], checked.console
    n_img, ok = re.search(r'data-images="(\d+):(\w+)"', checked.dom).groups()
    assert int(n_img) >= 8 and ok == "true"
    n_rows, asc, state = re.search(r'data-sorted="(\d+):(\w+):(\w+)"', checked.dom).groups()
    assert int(n_rows) == 30 * 9 and asc == "true" and state == "ascending"


def test_browser_check_sees_console_errors(tmp_path) -> None:
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><p>x</p><script>undefinedFunction();</script></body></html>")
    seen = load_page(bad)
    assert any("undefinedFunction is not defined" in m for m in seen.console)
    assert "<p>x</p>" in seen.dom
