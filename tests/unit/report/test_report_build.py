"""`sinkscope report` end to end on a tiny model: files, isolated failing sections, progress, CLI errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from sinkscope.cli.__main__ import main
from sinkscope.domains import domain_batch
from sinkscope.errors import InputError
from sinkscope.models.random_hf import save_tiny, tiny_model, tiny_tokenizer
from sinkscope.profile import profile_sinks
from sinkscope.report.build import build_report, parse_sections
from sinkscope.report.sections import ReportOptions

SMALL = ReportOptions(n_tokens=16, samples=2, batch_size=2)


def test_parse_sections() -> None:
    assert parse_sections(None) == ["model", "sinks", "drains", "dormant", "kv", "repetition"]
    assert parse_sections("dormant, model") == ["model", "dormant"]  # display order
    with pytest.raises(InputError, match="Did you mean: sinks"):
        parse_sections("sinkz")


def test_report_files_and_a_failing_section_beside_working_ones(tmp_path) -> None:
    # an unknown input kind makes the two sections that use it fail; the others must still render
    opts = ReportOptions(n_tokens=16, samples=2, batch_size=2, sink_kinds=("text", "prose"))
    seen: dict[str, tuple[int, int]] = {}
    res = build_report(tiny_model("llama"), tiny_tokenizer(), tmp_path / "r", options=opts,
                       sections=["model", "sinks", "drains", "dormant"], model_spec="tiny-llama",
                       progress=lambda d, t, k: seen.__setitem__(k, (d, t)))
    assert res.failed == ["sinks", "drains"]
    page = res.index.read_text()
    for key in ("model", "sinks", "drains", "dormant"):
        assert f'<section id="{key}"' in page
    assert page.count("This section failed:") == 2 and "unknown input domain &#x27;prose&#x27;" in page
    doc = json.loads((tmp_path / "r" / "report.json").read_text())
    assert {k: v["status"] for k, v in doc["sections"].items()} == {
        "model": "ok", "sinks": "failed", "drains": "failed", "dormant": "ok"}
    assert doc["sections"]["model"]["data"]["card"]["n_layers"] == 2
    assert set(doc["sections"]["model"]["data"]["timings_s"]) == {"model", "sinks", "drains", "dormant"}
    rows = list(csv.DictReader((tmp_path / "r" / "heads_dormancy.csv").open()))
    assert len(rows) == 2 * 4 and {"alpha0_text", "alpha0_code", "alpha0_random", "class"} <= set(rows[0])
    assert seen["dormant"][0] == seen["dormant"][1] and seen["model"] == (1, 1)


def test_all_profile_sections_ok_and_their_numbers_are_the_profiles(tmp_path) -> None:
    model, tok = tiny_model("llama"), tiny_tokenizer()
    res = build_report(model, tok, tmp_path, options=SMALL, sections=["sinks", "drains"])
    assert res.failed == []
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["sections"]["sinks"]["meaning"][0].startswith("Token 0 is an attention sink")
    kinds = doc["sections"]["sinks"]["data"]["kinds"]
    assert set(kinds) == {"text", "random", "repeat"}
    rows = {r["input"]: r for r in csv.DictReader((tmp_path / "sinks_by_input.csv").open())}
    for kind in kinds:  # each number is the one profile_sinks gives on the same built-in inputs
        batch = domain_batch(tok, kind, n_tokens=SMALL.n_tokens, samples=SMALL.samples, seed=SMALL.seed)
        prof = profile_sinks(model, batch, eps=SMALL.eps, batch_size=SMALL.batch_size)
        assert kinds[kind]["sink0"] == prof.sink_ratio(0)
        assert kinds[kind]["top_sinks"] == prof.top_sinks(6)
        assert float(rows[kind]["Sink_0"]) == pytest.approx(prof.sink_ratio(0), abs=1e-12)
        if kind == "text":  # the drains section reads the first kind's profile
            text_prof = prof
    norms = list(csv.DictReader((tmp_path / "norms_by_layer.csv").open()))
    assert [int(r["layer"]) for r in norms] == [0, 1]
    np.testing.assert_allclose([float(r["residual ratio"]) for r in norms], text_prof.residual_ratio(), rtol=1e-12)
    np.testing.assert_allclose([float(r["value ratio"]) for r in norms],
                               np.nanmean(text_prof.value_ratio(), axis=1), rtol=1e-12)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny") / "llama"), "llama")


def test_cli_report(model_dir, tmp_path) -> None:
    out = tmp_path / "rep"
    rc = main(["report", "--model", model_dir, "--out", str(out), "--sections", "model,dormant", "--tokens", "16",
               "--samples", "2", "--batch-size", "2"])
    assert rc == 0
    doc = json.loads((out / "report.json").read_text())
    assert doc["sections_run"] == ["model", "dormant"] and doc["model"] == model_dir
    assert "<!DOCTYPE html>" in (out / "index.html").read_text()


@pytest.mark.parametrize("args, message", [
    (["--sections", "sinkz"], "Did you mean: sinks"),
    (["--samples", "9"], "between 1 and 8"),
    (["--eps", "1.5"], "--eps"),
    (["--tokens", "2"], "at least 8"),
    (["--repeat-words", ""], "--repeat-words: give at least one word"),  # not a silent fall-back to the default
    (["--repeat-lengths", ""], "--repeat-lengths: give at least one number"),
    (["--repeat-lengths", "0,4"], "--repeat-lengths must be positive"),
    (["--repeat-lengths", "4,x"], "--repeat-lengths must be a comma list of integers"),
])
def test_cli_bad_input_is_one_line(model_dir, tmp_path, capsys, args, message) -> None:
    out = tmp_path / "never"
    assert main(["report", "--model", model_dir, "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
    assert not out.exists()


def test_repetition_section_on_a_tiny_model(tmp_path) -> None:
    opts = ReportOptions(n_tokens=16, samples=2, batch_size=2, repeat_words=("poem", "book", "big cat"),
                         repeat_lengths=(4, 8), repeat_new_tokens=4, circuit_per_layer=2)
    res = build_report(tiny_model("llama"), tiny_tokenizer(), tmp_path, options=opts, sections=["repetition"])
    assert res.failed == [], res.sections[0].details
    data = res.sections[0].data
    assert data["words"] == ["poem", "book"] and data["lengths"] == [4, 8]  # multi-token words are skipped
    rows = list(csv.DictReader((tmp_path / "repetition_cells.csv").open()))
    assert len(rows) == 4 and {r["word"] for r in rows} == {"poem", "book"}
    for n in (4, 8):  # each rate is the share of that length's answers judged diverged, as the cells say
        cells = [r for r in rows if int(r["n"]) == n]
        assert data["rates"][n] == sum(r["diverged"] == "True" for r in cells) / len(cells)
    assert "no first-token neuron found" in data["circuit_note"]  # a random tiny model has no sink circuit
    assert 'id="repetition" class="report-section ok"' in res.index.read_text()


def _direct_kl(model, patch, docs) -> tuple[float, int]:
    """Token-weighted mean KL(original || patched) over every position of ``docs``, by plain forwards."""
    import torch

    from sinkscope.interventions.patch import apply_patch
    from sinkscope.repetition.harm import encode_doc

    total, n = 0.0, 0
    with torch.no_grad():
        for d in docs:
            ids = torch.tensor([encode_doc(tiny_tokenizer(), d).ids])
            lo = model(input_ids=ids).logits[0].log_softmax(-1)
            with apply_patch(model, patch):
                lp = model(input_ids=ids).logits[0].log_softmax(-1)
            total += float((lo.exp() * (lo - lp)).sum(-1).clamp_min(0).sum())
            n += ids.shape[1]
    return total / n, n


def test_patch_effect_is_the_shipped_dedup_patch_and_its_harm_is_measured_where_it_acts() -> None:
    from sinkscope.repetition.harm import load_harm_set
    from sinkscope.repetition.patch_methods import DedupOptions, build_patch
    from sinkscope.report.html import Section
    from sinkscope.report.repetition import _patch_effect
    from sinkscope.report.sections import ReportContext

    model, tok = tiny_model("llama"), tiny_tokenizer()
    ctx = ReportContext(model, tok, ReportOptions(repeat_new_tokens=3, harm_documents=3), model_spec="tiny")
    sec = Section("repetition", "Repetition")
    sec.data["rates"] = {8: 0.5}
    got = _patch_effect(ctx, ["poem", "book"], ["poem", "book"], 8, sec)
    p = sec.data["patch"]
    assert p["method"] == "dedup" and sec.data["harm"]["method"] == "dedup"
    shipped = build_patch("dedup", DedupOptions(), base_model="tiny").patch
    assert p["description"] == shipped.describe()
    assert got == {8: 0.5 * p["still_diverged"] / 2} and len(sec.tables["patch_verdicts.csv"]) == 2
    harm = sec.data["harm"]
    docs = {d.name: d for d in load_harm_set("eval")}
    assert harm["set"] == "eval" and harm["documents"] == len(docs)
    assert len(harm["measured"]) == 3 and set(harm["measured"]) <= set(harm["gate_opens"])
    assert len({docs[n].family for n in harm["measured"]}) == 3  # round-robin over the families
    kl, n = _direct_kl(model, shipped, [docs[n] for n in harm["measured"]])
    row = next(r for r in harm["rows"] if r["family"] == "all")
    assert kl > 1e-8 and row["kl_all"] == pytest.approx(kl, rel=1e-4)  # ~1e-6 here: far above float noise
    assert sum(e["tokens"] for e in harm["effects"]) == n
    # no word diverged: nothing to stop, but the harm is still measured
    sec = Section("repetition", "Repetition")
    sec.data["rates"] = {8: 0.0}
    assert _patch_effect(ctx, ["poem"], [], 8, sec) is None
    assert sec.data["patch"]["still_diverged"] is None and sec.data["harm"]["rows"]
