"""`sinkscope scan` end to end on a tiny model directory, and its one-line errors."""

from __future__ import annotations

import csv
import json

import pytest

from sinkscope.cli.__main__ import main
from sinkscope.models.tiny import save_tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny") / "llama"), "llama")


def test_scan_writes_profile_heads_and_plots(model_dir, tmp_path) -> None:
    out = tmp_path / "scan"
    rc = main(["scan", "--model", model_dir, "--random", "24", "--samples", "3", "--out", str(out), "--bos", "always"])
    assert rc == 0
    prof = json.loads((out / "profile.json").read_text())
    assert 0 <= prof["sink_ratio"] <= 1
    assert prof["bos"] == {"policy": "always", "prepended": True}
    assert prof["inputs"]["lengths"] == [25, 25, 25]
    assert prof["versions"]["transformers"]
    assert prof["qk_alignment"]["positions"] and len(prof["qk_alignment"]["mean_by_layer"]) == 2
    rows = list(csv.DictReader((out / "heads.csv").open()))
    assert len(rows) == 2 * 4 and {"layer", "head", "alpha_0", "sink_rate_0"} <= set(rows[0])
    for name in ("sink_heatmap.png", "residual_norm_by_layer.png", "attention_on_first_by_layer.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--text", "   "], "empty text"),
    (["--random", "0"], "positive"),
    (["--repeat", "poem", "--times", "-2"], "positive"),
    (["--repeat", "the cat", "--times", "3"], "single-token"),
    (["--random", "500"], "longer than the model's context"),
    (["--file", "/no/such/file.txt"], "not found"),
    (["--text", "the cat", "--random", "3"], "exactly one input"),
    (["--random", "three"], "valid integer"),
])
def test_bad_input_is_one_line_and_writes_nothing(model_dir, tmp_path, capsys, args, message) -> None:
    out = tmp_path / "never"
    rc = main(["scan", "--model", model_dir, "--out", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error:") and message in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()


def test_unknown_model_and_unwritable_out(tmp_path, capsys) -> None:
    assert main(["scan", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--text", "hi"]) == 2
    assert "model path not found" in capsys.readouterr().err
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["scan", "--model", str(tmp_path / "nope"), "--out", str(f), "--text", "hi"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_scan_takes_device_dtype_and_refuses_bad_ones(model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "bf16"
    assert main(["scan", "--model", model_dir, "--random", "12", "--out", str(out), "--dtype", "bfloat16",
                 "--device", "cpu"]) == 0
    assert 0 <= json.loads((out / "profile.json").read_text())["sink_ratio"] <= 1
    capsys.readouterr()
    for args, message in ((["--device", "gpu"], "--device 'gpu' is not a device"),
                          (["--dtype", "int4"], "--dtype 'int4'"),
                          (["--revision", "main"], "--revision applies to hub models")):
        assert main(["scan", "--model", model_dir, "--random", "12", "--out", str(tmp_path / "x"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err


def test_ctrl_c_exits_130_with_a_resume_hint(model_dir, tmp_path, monkeypatch, capsys) -> None:
    import sinkscope.cli.common as common

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "load_model", interrupted, raising=False)
    monkeypatch.setattr("sinkscope.plugins.load_model", interrupted)
    assert main(["scan", "--model", model_dir, "--random", "12", "--out", str(tmp_path / "x")]) == 130
    assert "interrupted; resume with the same command" in capsys.readouterr().err
