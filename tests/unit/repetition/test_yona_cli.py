"""`sinkscope repeat sinkrun` and `repeat cluster --defence` on a tiny saved Llama: hostile options get a one-line
error (exit 2) and leave nothing behind; good ones write their results."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from sinkscope.cli.__main__ import main
from sinkscope.interventions.patch import NeuronRule, RepetitionGate, SinkPatch, save_patch


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["repeat", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err.strip()


@pytest.fixture()
def files(tmp_path: Path, tiny_dir: Path) -> dict[str, Path]:
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    neur = tmp_path / "neur"
    save_patch(SinkPatch([NeuronRule(0, [1, 2], [0.5, 0.5], [0.0, 0.0])], str(tiny_dir)), neur)
    dedup = tmp_path / "dedup"
    save_patch(SinkPatch([], str(tiny_dir), gate=RepetitionGate(4, 0.9), attention_dedup=True), dedup)
    none = tmp_path / "none"
    save_patch(SinkPatch([], str(tiny_dir), gate=RepetitionGate(4, 0.9), attention_dedup=True), none)
    other = tmp_path / "other"
    save_patch(SinkPatch([], "smollm2-135m", gate=RepetitionGate(4, 0.9), attention_dedup=True), other)
    return {"TINY": tiny_dir, "OUT": tmp_path / "out", "BLOCKER": blocker, "NEUR": neur, "DEDUP": dedup,
            "NONE": none, "OTHER": other, "MISSING": tmp_path / "missing", "PROC": Path("/proc/sinkscope-test/out")}


def _fill(args: list[str], files: dict[str, Path]) -> list[str]:
    return [str(files[a]) if a in files else a for a in args]


SR = ["sinkrun", "-m", "TINY", "--out", "OUT", "--words", "cat"]
HOSTILE = [
    (SR + ["--eps", "1.5"], "eps"),
    (SR + ["--eps", "nan"], "eps"),
    (SR + ["--share", "0"], "--share"),
    (SR + ["--share", "2"], "--share"),
    (SR + ["--min-queries", "0"], "--min-queries"),
    (SR + ["--forms", "nosuch"], "unknown prompt form"),
    (SR + ["--forms", " , "], "at least one prompt form"),
    (SR + ["--lengths", "0"], "positive"),
    (SR + ["--lengths", "a..b"], "bad --lengths"),
    (["sinkrun", "-m", "TINY", "--out", "OUT", "--word-set", "nosuch"], "unknown word set"),
    (["sinkrun", "-m", "TINY", "--out", "BLOCKER", "--words", "cat"], "not a directory"),
    (["sinkrun", "-m", "TINY", "--out", "PROC", "--words", "cat"], "cannot create output directory"),
    (SR[:-1] + ["cat,zebra"], "zebra"),
    (SR + ["--lengths", "100000"], "context"),
    (["cluster", "--patch", "NEUR", "--out", "OUT", "--defence", "MISSING"], "no sinkscope_manifest.json"),
    (["cluster", "--patch", "NEUR", "--out", "OUT", "--defence", "NONE"], "reserved"),
    (["cluster", "--patch", "NEUR", "--out", "OUT", "--defence", "OTHER"], "one model"),
]


@pytest.mark.parametrize("args, msg", HOSTILE, ids=[" ".join(a[:1] + a[-2:]) for a, _ in HOSTILE])
def test_hostile_options_one_line_and_nothing_written(files, capsys, args, msg):
    rc, _, err = _run(capsys, *_fill(args, files))
    assert rc == 2, err
    assert err.startswith("error:") and "\n" not in err, err
    assert msg in err, err
    assert not files["OUT"].exists()


def test_sinkrun_writes_its_results_and_resumes(files, capsys):
    args = _fill(SR + ["--forms", "repeat-colon,bare", "--lengths", "1..4", "--min-queries", "1"], files)
    rc, out, err = _run(capsys, *args)
    assert rc == 0, err
    d = files["OUT"]
    for name in ("cells.jsonl", "plan.json", "summary.json", "summary.csv", "cells.csv", "curves.csv", "sink_run.png"):
        assert (d / name).is_file(), name
    cells = [json.loads(x) for x in (d / "cells.jsonl").read_text().splitlines()]
    assert sorted((c["form"], c["n"]) for c in cells) == sorted((f, n) for f in ("repeat-colon", "bare")
                                                                for n in (1, 2, 4))
    bare1 = next(c for c in cells if c["form"] == "bare" and c["n"] == 1)
    assert max(bare1["distance"]) < 1e-6  # the bare form with one copy is the one-token sequence itself
    assert "bare N=    1" in out and "repeat-colon N=    4" in out
    rc, _, err = _run(capsys, *args)  # resume: nothing new
    assert rc == 0 and len((d / "cells.jsonl").read_text().splitlines()) == 6
    rc, _, err = _run(capsys, *args[:-2], "--eps", "0.4")
    assert rc == 2 and "other settings" in err


def test_cluster_with_a_defence_writes_both_variants(files, capsys):
    args = _fill(["cluster", "--patch", "NEUR", "--out", "OUT", "--defence", "DEDUP", "--words", "cat,dog",
                  "--lengths", "6", "--k", "4", "--probe-clusters", "4", "--max-new-tokens", "3"], files)
    rc, out, err = _run(capsys, *args)
    assert rc == 0, err
    with open(files["OUT"] / "rates.csv") as f:
        rates = list(csv.DictReader(f))
    assert {(r["kind"], r["variant"]) for r in rates} == {(k, v) for k in ("cluster", "repeat", "random")
                                                          for v in ("none", "dedup")}
    assert all(r["words"] == "2" for r in rates) and "95% CI" in out
