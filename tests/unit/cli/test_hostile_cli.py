"""Hostile inputs to the core commands (issue 21): each gets one line naming the problem, exit 2, and nothing
written; a busy output directory is refused; Ctrl-C says what is true of the command it stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sinkscope.cli.__main__ import interrupted_message, main
from sinkscope.io import OutputLock
from sinkscope.models.random_hf import save_tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return save_tiny(str(tmp_path_factory.mktemp("tiny") / "llama"), "llama")


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv", [
    ["scan", "--random", "8", "--out", ""],
    ["report", "--sections", "model", "--out", ""],
    ["stream", "eval", "--tokens", "40", "--sinks", "2", "--window", "8", "--out", ""],
])
def test_an_empty_out_is_refused_not_read_as_the_current_directory(model_dir, tmp_path, monkeypatch, capsys,
                                                                   argv) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([*argv[:1 + (argv[0] == "stream")], "--model", model_dir, *argv[1 + (argv[0] == "stream"):]]) == 2
    assert "output directory is empty" in _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []  # nothing written into the current directory


def test_report_refuses_empty_sections(model_dir, tmp_path, capsys) -> None:
    assert main(["report", "--model", model_dir, "--sections", "", "--out", str(tmp_path / "r")]) == 2
    assert "--sections: name at least one of model, sinks" in _one_line_error(capsys)
    assert not (tmp_path / "r").exists()


def test_report_exits_non_zero_when_its_only_section_failed(model_dir, tmp_path, monkeypatch, capsys) -> None:
    from sinkscope.report.sections import SECTIONS

    def broken(ctx, sec, progress):
        raise RuntimeError("measurement broke")

    monkeypatch.setitem(SECTIONS._items, "model", ("Model", broken))
    rc = main(["report", "--model", model_dir, "--sections", "model", "--out", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert rc == 1 and "(0/1 sections ok)" in out and "section model failed: RuntimeError: measurement broke" in out
    doc = json.loads((tmp_path / "r" / "report.json").read_text())
    assert doc["sections"]["model"]["status"] == "failed"  # the page still says why


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_stream_generate_refuses_a_temperature_that_is_not_a_finite_number(value, capsys, monkeypatch) -> None:
    def never(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr("sinkscope.models.load.load_model", never)
    assert main(["stream", "generate", "--prompt", "the cat", "--temperature", value]) == 2
    assert "--temperature must be a finite number >= 0" in _one_line_error(capsys)


def test_stream_generate_chat_without_a_chat_template(model_dir, capsys) -> None:
    assert main(["stream", "generate", "--model", model_dir, "--prompt", "the cat", "--chat", "-n", "2"]) == 2
    assert "this tokenizer has no chat template: drop --chat" in _one_line_error(capsys)


@pytest.mark.parametrize("command", ["scan", "report", "stream eval"])
def test_a_second_job_on_a_busy_out_is_refused(model_dir, tmp_path, capsys, command) -> None:
    out = tmp_path / "busy"
    args = {"scan": ["--random", "8"], "report": ["--sections", "model"],
            "stream eval": ["--tokens", "40", "--sinks", "2", "--window", "8"]}[command]
    with OutputLock(out):  # the first job holds the directory
        assert main([*command.split(), "--model", model_dir, *args, "--out", str(out)]) == 2
    assert "is in use by another sinkscope job" in _one_line_error(capsys)
    assert sorted(p.name for p in out.iterdir()) == [".sinkscope.lock"]  # the second job wrote nothing


def test_file_that_is_a_directory_is_named_as_one(model_dir, tmp_path, capsys) -> None:
    assert main(["scan", "--model", model_dir, "--file", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert f"--file {tmp_path} is a directory, not a file" in _one_line_error(capsys)


@pytest.mark.parametrize("argv, says", [
    (["stream", "generate", "--prompt", "x"], None),  # Ctrl-C is how it stops
    (["report", "--out", "r"], "nothing half-written"),
    (["scan", "--out", "o"], "nothing half-written"),
    (["repeat", "scan", "--out", "o"], "resume with the same command (repeat scan continues"),
    (["train", "c.yaml", "--out", "o"], "resume with the same command (train continues"),
])
def test_ctrl_c_message_is_true_of_the_command(argv, says) -> None:
    message = interrupted_message(argv)
    if says is None:
        assert message is None
    else:
        assert says in message
        assert ("resume" in message) == (argv[0] == "train" or argv[:2] == ["repeat", "scan"])


def test_ctrl_c_in_stream_generate_prints_no_resume_hint(model_dir, monkeypatch, capsys) -> None:
    def interrupted(*a, **k):
        raise KeyboardInterrupt
        yield  # a generator, as stream_generate is

    monkeypatch.setattr("sinkscope.streaming.generate.stream_generate", interrupted)
    assert main(["stream", "generate", "--model", model_dir, "--prompt", "the cat"]) == 130
    assert "resume" not in capsys.readouterr().err


def test_unknown_model_type_is_blamed_on_the_model(tmp_path, capsys) -> None:
    d = Path(save_tiny(str(tmp_path / "m"), "llama"))
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "florble"}))
    assert main(["scan", "--model", str(d), "--text", "the cat", "--out", str(tmp_path / "o")]) == 2
    err = _one_line_error(capsys)
    assert "model's type 'florble' (config.json model_type) is not an architecture transformers" in err
    assert "tokenizer" not in err.lower()
