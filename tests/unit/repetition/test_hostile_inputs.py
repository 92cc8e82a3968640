"""Hostile inputs to the `sinkscope repeat` commands (issue 21): each gets a one-line error (exit 2) or a correct
result, and leaves nothing half-written. Most are refused before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sinkscope.cli.__main__ import main
from sinkscope.errors import InputError, ModelLoadError
from sinkscope.interventions.patch import NeuronRule, RepetitionGate, SinkPatch, read_patch, save_patch

CORPUS = "the word cat a text . the poem tree book . " * 60


def _run(capsys, *argv: str) -> tuple[int, str]:
    rc = main(["repeat", *argv])
    err = capsys.readouterr().err.strip()
    return rc, err


def _one_line(rc: int, err: str, msg: str) -> None:
    assert rc == 2, err
    assert err.startswith("error:") and "\n" not in err, err
    assert msg in err, err


@pytest.fixture()
def files(tmp_path: Path, tiny_dir: Path) -> dict[str, Path]:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    one = tmp_path / "one.txt"
    one.write_text("cat")
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    dedup = tmp_path / "dedup"
    save_patch(SinkPatch([], str(tiny_dir), gate=RepetitionGate(4, 0.9), attention_dedup=True), dedup)
    neur = tmp_path / "neur"
    save_patch(SinkPatch([NeuronRule(0, [1, 2], [0.5, 0.5], [0.0, 0.0])], str(tiny_dir)), neur)
    paper = tmp_path / "paper"
    save_patch(SinkPatch([NeuronRule(0, [1, 2], [0.0, 0.0], [0.0, 0.0])], str(tiny_dir)), paper)
    words = tmp_path / "words.txt"
    words.write_text("cat\ndog\n")
    return {"CORPUS": corpus, "ONE": one, "BLOCKER": blocker, "DEDUP": dedup, "NEUR": neur, "PAPER": paper,
            "WORDS": words, "TINY": tiny_dir, "OUT": tmp_path / "out", "PROC": Path("/proc/sinkscope-test/out")}


def _fill(args: list[str], files: dict[str, Path]) -> list[str]:
    return [str(files[a]) if a in files else a for a in args]


#: (command line, message): refused before the model loads, nothing written
EARLY = [
    (["scan", "-m", "TINY", "--out", "OUT", "--words", "cat", "--batch-size", "0"], "--batch-size must be a positive"),
    (["scan", "-m", "TINY", "--out", "OUT", "--words", "cat", "--max-new-tokens", "0"], "--max-new-tokens must be"),
    (["scan", "-m", "TINY", "--out", "OUT", "--words", "cat", "--sinkness-words", "-5"], "--sinkness-words"),
    (["scan", "-m", "TINY", "--out", "OUT", "--words", "cat", "--words-file", "WORDS"], "not both"),
    (["scan", "-m", "TINY", "--out", "BLOCKER", "--words", "cat"], "not a directory"),
    (["scan", "-m", "TINY", "--out", "PROC", "--words", "cat"], "cannot create output directory"),
    (["circuit", "-m", "TINY", "--out", "OUT", "--batch-size", "0"], "--batch-size must be a positive"),
    (["circuit", "-m", "TINY", "--out", "OUT", "--max-new-tokens", "0"], "--max-new-tokens must be"),
    (["circuit", "-m", "TINY", "--out", "OUT", "--per-layer", "0", "--no-heads"], "nothing to ablate"),
    (["circuit", "-m", "TINY", "--out", "BLOCKER"], "not a directory"),
    (["circuit", "-m", "TINY", "--out", "PROC"], "cannot create output directory"),
    (["cluster", "--patch", "NEUR", "--out", "OUT", "--batch-size", "0"], "--batch-size must be a positive"),
    (["cluster", "--patch", "NEUR", "--out", "OUT", "--max-new-tokens", "0"], "--max-new-tokens must be"),
    (["cluster", "--patch", "NEUR", "--out", "OUT", "--probe-clusters", "0"], "--probe-clusters must be"),
    (["cluster", "--patch", "PAPER", "--out", "OUT"], "threshold 0"),
    (["cluster", "--patch", "NEUR", "--out", "BLOCKER"], "not a directory"),
    (["cluster", "--patch", "NEUR", "--out", "PROC"], "cannot create output directory"),
    (["patch", "-m", "TINY", "--save", "BLOCKER"], "not a directory"),
    (["patch", "-m", "TINY", "--save", "PROC"], "cannot create output directory"),
    (["patch", "-m", "TINY", "--save", "OUT", "--method", "neurons", "--fire-min", "-3"], "--fire-min is a share"),
    (["patch", "-m", "TINY", "--save", "OUT", "--method", "dedup", "--fire-min", "0.5"], "does not apply"),
    (["patch", "-m", "TINY", "--save", "OUT", "--method", "bogus"], "unknown --method 'bogus'"),
    (["evaluate", "--patch", "DEDUP", "--out", "OUT", "--words", "cat", "--no-text", "--no-divergence"],
     "nothing to do"),
    (["evaluate", "--patch", "DEDUP", "--out", "OUT", "--words", "cat", "--batch-size", "0"], "--batch-size"),
]


@pytest.mark.parametrize("args, msg", EARLY, ids=[" ".join(a[:1] + a[-2:]) for a, _ in EARLY])
def test_refused_before_the_model_loads(files, capsys, monkeypatch, args, msg):
    import sinkscope.cli.repeat as cli

    monkeypatch.setattr(cli.ModelOptions, "load", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    _one_line(*_run(capsys, *_fill(args, files)), msg)
    assert not files["OUT"].exists()  # nothing written, not even the directory


#: (command line, message): refused once the model (tokenizer) or the inputs are read, nothing written
LATE = [
    (["scan", "-m", "TINY", "--out", "OUT", "--words", "cat,zebra"], "unknown token"),
    (["circuit", "-m", "TINY", "--out", "OUT", "--corpus", "ONE", "--words", "cat"], "give a longer --corpus"),
    (["cluster", "--patch", "NEUR", "--out", "OUT", "--words", "cat", "--k", "100000"], "more clusters than"),
]


@pytest.mark.parametrize("args, msg", LATE, ids=[" ".join(a[:1] + a[-2:]) for a, _ in LATE])
def test_refused_once_inputs_are_read(files, capsys, args, msg):
    _one_line(*_run(capsys, *_fill(args, files)), msg)
    assert not files["OUT"].exists()


def test_circuit_leaves_no_statistics_when_it_fails(files, capsys):
    out = files["OUT"]
    _one_line(*_run(capsys, "circuit", "-m", str(files["TINY"]), "--out", str(out), "--corpus",
                    str(files["ONE"]), "--words", "cat"), "give a longer --corpus")
    assert not (out / "neuron_stats.pt").exists()


def _crafted_pickle(path: Path) -> None:
    class Boom:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"first": Boom()}, path)


@pytest.mark.parametrize("what, msg", [
    ("crafted", "pickled objects other than tensors, which are refused"),
    ("garbage", "is not a tensor file"),
    ("wrong", "not neuron statistics"),
    ("json", "circuit.json is not a circuit"),
    ("missing", "no circuit.json + neuron_stats.pt"),
])
def test_circuit_artefacts_from_users_are_refused(files, tmp_path, capsys, what, msg):
    from sinkscope.repetition.activations import NeuronStats, save_neuron_stats

    d = tmp_path / "circ"
    d.mkdir()
    (d / "circuit.json").write_text(json.dumps({"components": [], "runs": [], "settings": {}}))
    z = [torch.zeros(4)]
    save_neuron_stats(NeuronStats(z, z, z, z, 3), d / "neuron_stats.pt")
    if what == "crafted":
        _crafted_pickle(d / "neuron_stats.pt")
    elif what == "garbage":
        (d / "neuron_stats.pt").write_bytes(bytes(range(256)) * 8)
    elif what == "wrong":
        torch.save({"first": torch.zeros(3)}, d / "neuron_stats.pt")
    elif what == "json":
        (d / "circuit.json").write_text('{"components": [{"layer": 0,')
    else:
        (d / "circuit.json").unlink()
    rc, err = _run(capsys, "patch", "-m", str(files["TINY"]), "--save", str(files["OUT"]), "--method", "neurons",
                   "--circuit", str(d))
    _one_line(rc, err, msg)
    assert "code ran" not in capsys.readouterr().out
    assert not files["OUT"].exists()


@pytest.mark.parametrize("edit, msg", [
    ({"version": 99}, "version 99"),
    ({"surprise": 1}, "unknown key(s) surprise"),
    ({"rules": [{"layer": 0, "index": [1], "threshold": [float("nan")], "value": [0.0]}]}, "not a finite"),
    ({"rules": [{"layer": 0, "index": [1], "threshold": [0.5], "value": [float("inf")]}]}, "not a finite"),
    ({"rules": [{"layer": 0, "index": [1], "threshold": [0.5], "value": [0.0], "x": 1}]}, "unknown key(s) x"),
])
def test_patch_manifests_are_checked(files, capsys, edit, msg):
    path = files["NEUR"] / "sinkscope_manifest.json"
    d = json.loads(path.read_text())
    d.update(edit)
    path.write_text(json.dumps(d))  # NaN / Infinity as Python's json writes them
    with pytest.raises(ModelLoadError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        read_patch(files["NEUR"])
    rc, err = _run(capsys, "evaluate", "--patch", str(files["NEUR"]), "--out", str(files["OUT"]), "--words", "cat")
    _one_line(rc, err, msg)


def test_changed_settings_on_an_existing_out_are_refused(files, capsys):
    base = ["scan", "-m", str(files["TINY"]), "--out", str(files["OUT"]), "--words", "cat", "--lengths", "4",
            "--sinkness-words", "0"]
    assert main(["repeat", *base, "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    lines = (files["OUT"] / "cells.jsonl").read_text()
    _one_line(*_run(capsys, *base, "--max-new-tokens", "5"), "max_new_tokens=3")
    assert (files["OUT"] / "cells.jsonl").read_text() == lines  # the old answers are untouched
    assert main(["repeat", *base[:-4], "--words", "cat,dog", "--lengths", "4", "--max-new-tokens", "3",
                 "--sinkness-words", "0"]) == 0  # a new word extends the same grid
    assert len((files["OUT"] / "cells.jsonl").read_text().splitlines()) == 2


def test_a_second_job_on_the_same_out_is_refused(files, capsys):
    from sinkscope.io import OutputLock

    files["OUT"].mkdir()
    with OutputLock(files["OUT"]):  # a first job holds it
        for argv in (["scan", "-m", str(files["TINY"]), "--words", "cat"],
                     ["evaluate", "--patch", str(files["DEDUP"]), "--words", "cat"]):
            _one_line(*_run(capsys, *argv, "--out", str(files["OUT"])), "in use by another sinkscope job")
    assert not (files["OUT"] / "cells.jsonl").exists()


def test_cells_are_strict_json(files, capsys):
    """Answers under 3 tokens have no trigram: distinct3 is null, never NaN."""
    assert main(["repeat", "scan", "-m", str(files["TINY"]), "--out", str(files["OUT"]), "--words", "cat,dog",
                 "--lengths", "4", "--max-new-tokens", "2", "--sinkness-words", "0"]) == 0

    def refuse(name: str) -> float:
        raise AssertionError(f"{name} in cells.jsonl")

    for line in (files["OUT"] / "cells.jsonl").read_text().splitlines():
        cell = json.loads(line, parse_constant=refuse)
        assert cell["distinct3"] is None


def test_unknown_words_are_not_single_token_words(tiny_tok):
    from sinkscope.repetition.words import run_token_id

    assert tiny_tok.convert_ids_to_tokens(tiny_tok(" zebra", add_special_tokens=False)["input_ids"]) == ["<unk>"]
    with pytest.raises(InputError, match="not in this tokenizer's vocabulary"):
        run_token_id(tiny_tok, "zebra")
    assert run_token_id(tiny_tok, "cat") == tiny_tok.convert_tokens_to_ids("cat")


def test_neuron_stats_roundtrip_keeps_every_tensor(tmp_path):
    from sinkscope.repetition.activations import NeuronStats, load_neuron_stats, save_neuron_stats

    g = torch.Generator().manual_seed(0)
    t = [torch.randn(5, generator=g) for _ in range(2)]
    save_neuron_stats(NeuronStats(t, t, t, t, 7), tmp_path / "s.pt")
    back = load_neuron_stats(tmp_path / "s.pt")
    assert back.n_positions == 7 and all(torch.equal(a, b) for a, b in zip(back.other_max, t))
