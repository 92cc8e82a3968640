"""The KV heads section of `sinkscope report` on a tiny model: its numbers are `sinkscope.kv.calibrate`'s."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from sinkscope.kv.calibrate import calibrate, default_window
from sinkscope.models.random_hf import tiny_model, tiny_tokenizer
from sinkscope.report.build import build_report, parse_sections
from sinkscope.report.explain import explain_kv
from sinkscope.report.sections import ReportOptions

L = 64


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    out = tmp_path_factory.mktemp("kv")
    seen: list[tuple[int, int | None]] = []
    res = build_report(model, tok, out, options=ReportOptions(n_tokens=16, samples=2, batch_size=2, kv_length=L),
                       sections=["kv"], progress=lambda d, t, k: seen.append((d, t)))
    return model, tok, out, res, seen


def test_kv_is_a_section() -> None:
    assert "kv" in parse_sections(None)
    assert parse_sections("repetition,kv") == ["kv", "repetition"]


def test_map_and_line_are_what_calibrate_returns_on_the_same_inputs(report) -> None:
    model, tok, out, res, _ = report
    assert res.failed == [], res.sections[0].details
    data = res.sections[0].data
    W = default_window(0.25, 4, L)
    assert data["window"] == W and data["n_sink"] == 4 and data["length"] == L
    line = {r["budget"]: r for r in data["line"]}
    assert sorted(line) == [0.125, 0.25, 0.5]
    for b in (0.125, 0.25, 0.5):  # calibrate at each budget (its own profiling pass) gives the same policy and KL
        ref = calibrate(model, tok, target_length=L, n_sink=4, window=W, budget=b).policy
        assert line[b]["n_full"] == ref.n_full
        assert line[b]["bytes_fraction"] == pytest.approx(ref.bytes_fraction(L), abs=1e-12)
        assert line[b]["kl"] == pytest.approx(ref.measured_kl, rel=1e-6, abs=1e-12)
        if b == 0.25:
            np.testing.assert_allclose(data["distant"], ref.scores_array()[..., 0], rtol=1e-9)
            assert data["full_heads"] == [list(h) for h in ref.full_heads]
            assert data["measured_kl"] == ref.measured_kl
    assert line[0.125]["n_full"] == 0 and line[0.5]["n_full"] > line[0.25]["n_full"] > 0
    assert line[0.5]["kl"] != line[0.125]["kl"]


def test_files_and_page(report) -> None:
    _, _, out, res, _ = report
    rows = list(csv.DictReader((out / "kv_heads.csv").open()))
    data = res.sections[0].data
    assert len(rows) == data["n_layers"] * data["n_kv_heads"] == 4
    full = {(int(r["layer"]), int(r["kv_head"])) for r in rows if r["cache"] == "full"}
    assert full == {(l, h) for l, hs in enumerate(data["full_heads"]) for h in hs}
    for r in rows:
        assert float(r["distant"]) == pytest.approx(data["distant"][int(r["layer"])][int(r["kv_head"])])
    doc = json.loads((out / "report.json").read_text())
    meaning = doc["sections"]["kv"]["meaning"]
    assert meaning[0].startswith(f"At {100 * data['budget']:.0f}% of the dense cache's bytes ({L} tokens), "
                                 f"{data['n_full']} of 4 kv heads keep every token")
    page = res.index.read_text()
    assert page.count("<img") == 2 and 'id="kv" class="report-section ok"' in page


def test_progress_counts_up_to_one_total(report) -> None:
    seen = report[-1][1:]  # after the section's start (0, None)
    totals = {t for _, t in seen}
    assert len(totals) == 1 and seen[-1][0] == seen[-1][1]
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def _data(**kw):
    base = {"n_full": 2, "n_heads": 10, "budget": 0.25, "length": 512, "n_sink": 4, "window": 60,
            "criterion": "drop_error", "measured_kl": 0.02, "full_layers": [3], "full_share_of_distant": 0.5,
            "full_in_top_distant": 2, "distant_full_mean": 0.9, "distant_streaming_mean": 0.1, "seconds": 10.0,
            "line": [{"budget": 0.125, "n_full": 0, "kl": 0.3}, {"budget": 0.25, "n_full": 2, "kl": 0.02}]}
    return {**base, **kw}


def test_explanation_follows_the_numbers() -> None:
    good = explain_kv(_data())
    assert "within the 0.05 nats/token" in good[0] and "the two rankings agree" in good[1]
    assert "falls as full heads are added; at 12.5% no head keeps the full cache" in good[2]
    bad = explain_kv(_data(measured_kl=0.2, full_in_top_distant=1,
                           line=[{"budget": 0.125, "n_full": 1, "kl": 0.1}, {"budget": 0.25, "n_full": 2, "kl": 0.2}]))
    assert "above 0.05 nats/token" in bad[0] and "1 of the 2 are also among" in bad[1]
    assert "does not fall" in bad[2] and "no head keeps" not in bad[2]


def test_head_map_outlines_exactly_the_full_heads() -> None:
    from matplotlib.patches import Rectangle

    from sinkscope.viz.kv import kv_budget_line, kv_head_map

    distant = np.array([[0.1, 0.9, 0.3], [0.5, 0.2, 0.7]])
    full = np.array([[False, True, False], [False, False, True]])
    ax = kv_head_map(distant, full, budget=0.25).axes[0]
    boxes = sorted((int(p.get_y() + 0.5), int(p.get_x() + 0.5)) for p in ax.patches if isinstance(p, Rectangle))
    assert boxes == [(0, 1), (1, 2)]
    cells = {t.get_text() for t in ax.texts}
    assert cells == {"0.10", "0.90 F", "0.30", "0.50", "0.20", "0.70 F"}
    assert np.array_equal(ax.images[0].get_array(), distant) and "2 of 6, budget 25.0%" in ax.get_title()
    line = kv_budget_line([0.5, 0.125, 0.25], [0.02, 0.4, 0.2]).axes[0].lines[0]
    assert list(line.get_xdata()) == [12.5, 25.0, 50.0] and list(line.get_ydata()) == [0.4, 0.2, 0.02]
    with pytest.raises(ValueError):
        kv_head_map(distant, full[:1])
