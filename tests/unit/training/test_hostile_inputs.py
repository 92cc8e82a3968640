"""Hostile inputs to `sinkscope train` (issue 21): each gets a one-line error and leaves nothing half-written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from sinkscope.cli.__main__ import main as cli_main
from sinkscope.errors import InputError
from sinkscope.io import OutputLock
from sinkscope.training.config import ConfigError, config_from_dict
from sinkscope.training.loop import train

from .conftest import tiny_dict


def _config(tmp_path: Path, corpus: Path, **sections: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_dict(corpus, **sections)))
    return path


def _one_line_error(capsys: pytest.CaptureFixture, needle: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err, err
    return err


@pytest.mark.parametrize("content,needle", [
    (b"model:\n  d_model: 32\n  attention: \xff\xfe\n", "is not UTF-8 text (invalid byte at offset"),
    (b"model: {d_model: 32}\x00\n", "is not text (it contains NUL bytes)"),
    (b"", "config is empty"),
    (b"   \n\n", "config is empty"),
    (b"# nothing but a comment\n", "config is empty"),
    (b"{}\n", "config is empty"),
])
def test_unreadable_or_empty_config_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture, content: bytes,
                                               needle: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(content)
    assert cli_main(["train", str(cfg), "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, needle)
    assert not (tmp_path / "o").exists()  # the built-in 1000-step default never starts


def test_empty_base_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("# empty\n")
    (tmp_path / "top.yaml").write_text("base: base.yaml\ntrain: {steps: 3}\n")
    from sinkscope.training.config import load_config

    with pytest.raises(ConfigError, match="config is empty: .*base.yaml"):
        load_config(tmp_path / "top.yaml")


def test_unknown_device_is_one_line(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["train", str(_config(tmp_path, corpus)), "--out", str(tmp_path / "o"), "train.device=tpu"]) == 2
    _one_line_error(capsys, "train.device 'tpu' is not a device; use cpu, cuda, cuda:N, mps or auto")
    assert not (tmp_path / "o").exists()


def test_cuda_without_cuda_is_one_line(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine as one without a GPU
    assert cli_main(["train", str(_config(tmp_path, corpus)), "--out", str(tmp_path / "o"), "train.device=cuda"]) == 2
    _one_line_error(capsys, "train.device cuda: no CUDA device is available here")
    assert not (tmp_path / "o").exists()


def test_auto_device_is_cuda_when_available_else_cpu(corpus: Path, tmp_path: Path) -> None:
    res = train(config_from_dict(tiny_dict(corpus, train={"steps": 1, "device": "auto"})), tmp_path / "o")
    assert res.final["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("task,content,needle", [
    ("bigram_backcopy", bytes(range(256)) * 8, "is not text (it contains NUL bytes)"),
    ("text", bytes(range(256)) * 8, "is not text (it contains NUL bytes)"),
    ("text", "café ".encode() * 50 + b"\xff\xfe" + b"abc" * 50, "is not UTF-8 text (invalid byte at offset 300)"),
])
def test_binary_corpus_is_refused(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture, task: str,
                                  content: bytes, needle: str) -> None:
    binary = tmp_path / "random.bin"
    binary.write_bytes(content)
    args = [f"data.task={task}", f"data.corpus={binary}"]
    assert cli_main(["train", str(_config(tmp_path, corpus)), "--out", str(tmp_path / "o"), *args]) == 2
    _one_line_error(capsys, f"data file {binary} {needle}")
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_steps_below_the_checkpoint_are_refused(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = _config(tmp_path, corpus)
    out = tmp_path / "o"
    assert cli_main(["train", str(cfg), "--out", str(out)]) == 0  # 12 steps, checkpoint at step 12
    before = {name: (out / name).read_bytes() for name in ("final.json", "metrics.jsonl", "config.yaml")}
    capsys.readouterr()
    assert cli_main(["train", str(cfg), "--out", str(out), "train.steps=5"]) == 2
    _one_line_error(capsys, f"train.steps=5 is below the step of the checkpoint in {out} (12)")
    assert {name: (out / name).read_bytes() for name in before} == before  # nothing rewritten


def test_a_second_run_on_the_same_out_is_refused(tiny_cfg, tmp_path: Path) -> None:
    out = tmp_path / "o"
    with OutputLock(out):  # another job holds the directory
        with pytest.raises(InputError, match="is in use by another sinkscope job"):
            train(tiny_cfg, out)
    assert not (out / "metrics.jsonl").exists()
    res = train(tiny_cfg, out)  # the lock goes with the job that held it
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 3, 6, 9, 12] and res.final["step"] == 12  # every row once


class _Payload:
    """A pickled object whose unpickling would create a file: loading it must not run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_crafted_checkpoint_is_refused_without_running_it(tiny_cfg, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    train(tiny_cfg, run)
    marker = tmp_path / "pwned"
    torch.save({"format": 1, "step": 3, "model": _Payload(marker)}, run / "checkpoint.pt")
    capsys.readouterr()
    for argv in (["train", "profile", str(run)], ["train", "diagnose", "parts", str(run)]):
        assert cli_main(argv) == 2
        err = _one_line_error(capsys, "holds pickled Python objects (posix.mkdir), which are refused")
        assert "Weights only load failed" not in err
    cfg = tmp_path / "c.yaml"
    cfg.write_text(tiny_cfg.to_yaml())
    assert cli_main(["train", str(cfg), "--out", str(run)]) == 2  # resuming it: the same one line
    _one_line_error(capsys, "holds pickled Python objects")
    assert not marker.exists()


def test_garbage_checkpoint_is_named_corrupt(tiny_cfg, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    train(tiny_cfg, run)
    (run / "checkpoint.pt").write_bytes(bytes(range(256)) * 4)
    assert cli_main(["train", "profile", str(run)]) == 2
    err = _one_line_error(capsys, "is corrupt or unreadable")
    assert err.endswith(")")  # whole words: never cut mid-word


def test_progress_is_shown_while_training(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["train", str(_config(tmp_path, corpus)), "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err  # not a terminal: plain lines with count, rate and time left
    last = [line for line in err.splitlines() if line.startswith("train: ")][-1]
    assert last.startswith("train: 12/12 steps, 100%") and "/s" in last and "left 0:00" in last
    assert "eval loss" in last and "Sink_0" in last


def test_progress_callback_sees_every_step(tiny_cfg, tmp_path: Path) -> None:
    seen: list[tuple[int, int | None]] = []
    train(tiny_cfg, tmp_path / "o", progress=lambda done, total, what: seen.append((done, total)))
    assert seen == [(i, 12) for i in range(13)]


def test_positions_refuses_a_folder_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "probes"
    assert cli_main(["train", "positions", str(out), str(tmp_path)]) == 2
    _one_line_error(capsys, "is not a run directory of `sinkscope train` (no config.yaml)")
    assert not out.exists()  # refused before any output


def test_positions_figure_only_needs_a_figure(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {}\n")
    assert cli_main(["train", "positions", str(tmp_path / "probes"), str(run), "--figure-only"]) == 2
    _one_line_error(capsys, "--figure-only needs --figure PNG")
