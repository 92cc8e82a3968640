"""`sinkscope repeat evaluate` on a tiny model: the grid against each patch and the unpatched model, the harm
documents and text, resume; bad input as one-line errors before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sinkscope.cli.__main__ import main
from sinkscope.repetition.harm import CLOSE, OPEN

TEXT = "the word cat a text . the poem tree book . " * 40


@pytest.fixture()
def setup(tiny_dir: Path, tmp_path: Path):
    patch = tmp_path / "dedup"
    assert main(["repeat", "patch", "--method", "dedup", "--model", str(tiny_dir), "--save", str(patch),
                 "--window", "4", "--dedup-keep", "2", "--dedup-queries", "gated"]) == 0
    harm = tmp_path / "harm"
    harm.mkdir()
    (harm / "a.txt").write_text(f"family: count\nformat: text\n---\nthe word {OPEN}{' '.join(['dog'] * 10)}{CLOSE}"
                                " cat tree poem book\n")
    (harm / "b.txt").write_text(f"family: table\nformat: text\n---\na {OPEN}dog dog{CLOSE} the word tree\n")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    return patch, harm, corpus


def test_evaluate_grid_harm_and_resume(setup, tmp_path: Path, capsys):
    patch, harm, corpus = setup
    out = tmp_path / "ev"
    args = ["repeat", "evaluate", "--patch", str(patch), "--out", str(out), "--words", "cat,dog,poem",
            "--forms", "instruct,bare,repeat-colon", "--lengths", "4,8", "--max-new-tokens", "3",
            "--harm-sets", str(harm), "--corpus", str(corpus), "--batch-size", "4"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "36 answers (3 words x 3 forms x 2 lengths x 2 variants)" in printed
    assert "nan%" not in printed  # a cell where nothing diverged unpatched has no relative reduction: "n/a"
    ev = json.loads((out / "evaluation.json").read_text())
    assert len(ev["summary"]) == 12 and ev["settings"]["protocol"] is False
    se = ev["side_effects"]["dedup"]
    fams = {r["family"]: r for r in se["harm"]["harm"]["families"]}
    assert fams["count"]["gate_opened"] == 1 and fams["table"]["gate_opened"] == 0
    assert fams["table"]["kl_all"] == 0.0 and se["text"]["kl"] == 0.0  # the gate never opens there
    assert (out / "harm_harm_dedup.csv").is_file() and (out / "summary.csv").is_file()
    lines = (out / "cells.jsonl").read_text().splitlines()
    assert len(lines) == 36
    assert main(args + ["--no-text"]) == 0  # resumed: nothing left to generate
    assert (out / "cells.jsonl").read_text().splitlines() == lines
    text_only = tmp_path / "text_only"  # no divergence grid: the directory is still made
    assert main(["repeat", "evaluate", "--patch", str(patch), "--out", str(text_only), "--no-divergence",
                 "--harm-sets", str(harm), "--corpus", str(corpus), "--words", "cat"]) == 0
    assert (text_only / "evaluation.json").is_file() and not (text_only / "cells.jsonl").exists()


@pytest.mark.parametrize("args, msg", [
    (["--words-file", "/nonexistent/words.txt"], "word file not found"),
    (["--words", "cat dog"], "tokens"),
    (["--words", ""], "--words: give at least one word"),
    (["--words", "cat", "--lengths", "100000"], "context"),
    (["--words", "cat", "--forms", "sonnet"], "unknown prompt form"),
    (["--word-set", "holdout"], "unknown word set"),
    (["--words", "cat", "--harm-sets", "EMPTY"], "is empty"),
    (["--words", "cat", "--harm-sets", "/nonexistent/harm"], "harm set not found"),
    (["--words", "cat", "--dtype", "float8"], "--dtype 'float8'"),
    (["--words-file", "/nonexistent/words.txt"], "word file not found"),
    (["--words-file", "BINARY"], "is not text"),
    (["--words-file", "COMMENTS"], "word file has no words"),
])
def test_evaluate_bad_input(setup, tmp_path: Path, capsys, args, msg):
    patch, harm, corpus = setup
    (tmp_path / "empty").mkdir()
    (tmp_path / "words.bin").write_bytes(b"cat\x00\xff\xfe")
    (tmp_path / "words.txt").write_text("# only a comment\n\n")
    files = {"EMPTY": tmp_path / "empty", "BINARY": tmp_path / "words.bin", "COMMENTS": tmp_path / "words.txt"}
    args = [str(files[a]) if a in files else a for a in args]
    rc = main(["repeat", "evaluate", "--patch", str(patch), "--out", str(tmp_path / "o"), "--corpus", str(corpus),
               "--max-new-tokens", "2", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and msg in err and "\n" not in err


@pytest.mark.parametrize("command", ["evaluate", "scan"])
def test_outputs_are_checked_before_the_model_loads(setup, tmp_path: Path, capsys, monkeypatch, command):
    import sinkscope.cli.repeat as cli

    patch, _, _ = setup
    monkeypatch.setattr(cli.ModelOptions, "load", lambda *a, **k: pytest.fail("loaded the model before checking --out"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    head = (["repeat", "evaluate", "--patch", str(patch)] if command == "evaluate"
            else ["repeat", "scan", "--model", str(patch.parent / "tiny-llama")])
    for out, msg in ((blocker, "not a directory"), (blocker / "sub", "not a directory")):
        rc = main([*head, "--out", str(out), "--words", "cat"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "error:" in err and "\n" not in err, err
        assert msg in err or "cannot create" in err, err


def test_patch_cli_yona_method(tiny_dir: Path, tmp_path: Path, capsys):
    """A 2-layer model has no layer above mean + 2 std of two values: a one-line error, nothing saved."""
    rc = main(["repeat", "patch", "--method", "yona", "--model", str(tiny_dir), "--save", str(tmp_path / "y"),
               "--words", "cat,dog,poem"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no layer passes the sink-layer rule" in err and "\n" not in err
    assert not (tmp_path / "y").exists()
