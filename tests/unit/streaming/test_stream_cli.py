"""`sinkscope stream eval` on a tiny model directory: the shipped corpus as default input, the mode it used, and
one-line errors for bad input (written before any output)."""

from __future__ import annotations

import json

import pytest

from sinkscope.cli.__main__ import main
from sinkscope.models.random_hf import save_tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny") / "llama"), "llama")  # context 128


def test_default_file_is_the_shipped_corpus_and_modes_are_printed(model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "ev"
    rc = main(["stream", "eval", "--model", model_dir, "--tokens", "50", "--sinks", "2", "--window", "8",
               "--policies", "dense,sinks,sinks_plain", "--chunk", "16", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["file"].endswith("wikitext2-valid.txt") and summary["mode"] == "auto"
    assert {k: p["mode"] for k, p in summary["policies"].items()} == {
        "dense": "fast", "sinks": "token", "sinks_plain": "fast"}
    captured = capsys.readouterr()
    assert "exact blocks of 16" in captured.err and "sinks token" in captured.err
    for policy in ("dense", "sinks", "sinks_plain"):  # a log (not a terminal) gets plain progress lines
        assert f"{policy}: 49/49 tokens, 100%" in captured.err and f"{policy}: 0/49 tokens, 0%" in captured.err
    assert main(["stream", "eval", "--model", model_dir, "--tokens", "50", "--sinks", "2", "--window", "8",
                 "--policies", "sinks_plain", "--token-by-token", "--out", str(tmp_path / "tok")]) == 0
    tok = json.loads((tmp_path / "tok" / "summary.json").read_text())["policies"]["sinks_plain"]
    assert tok["mode"] == "token" and abs(tok["ppl"] - summary["policies"]["sinks_plain"]["ppl"]) < 1e-3


@pytest.mark.parametrize("args, message", [
    (["--tokens", "1000"], "has 300 tokens, fewer than --tokens 1000"),
    (["--tokens", "9"], "never evicts"),
    (["--sinks", "-1"], "--sinks must be >= 0"),
    (["--window", "0"], "--window must be >= 1"),
    (["--window", "200", "--tokens", "250"], "exceed the model's context (128)"),
    (["--chunk", "0"], "--chunk must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--policies", "sink"], "unknown --policies"),
    (["--file", "EMPTY"], "--file is empty"),
    (["--file", "BINARY"], "not text"),
    (["--file", "LATIN1"], "not UTF-8 text"),
    (["--file", "/no/such/file.txt"], "--file not found"),
])
def test_bad_input_is_one_line(model_dir, tmp_path, capsys, args, message) -> None:
    files = {"EMPTY": b"  \n", "BINARY": b"PK\x03\x04\x00\x00binary", "LATIN1": "caf\xe9 cr\xe8me".encode("latin-1"),
             "SMALL": b"the cat sat " * 100}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    args = [str(tmp_path / a) if a in files else a for a in args]
    small = [] if "--file" in args else ["--file", str(tmp_path / "SMALL")]
    base = ["--tokens", "40", "--sinks", "2", "--window", "8", *small]
    rc = main(["stream", "eval", "--model", model_dir, *base, *args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error:") and message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "o" / "summary.json").exists()


@pytest.mark.parametrize("args, message", [(["--top-k", "0"], "--top-k"), (["--prefill-chunk", "0"], "--prefill")])
def test_generate_bad_input(model_dir, capsys, args, message) -> None:
    assert main(["stream", "generate", "--model", model_dir, "--prompt", "the cat", "-n", "3", *args]) == 2
    assert message in capsys.readouterr().err
