"""`sinkscope scan` end to end on a tiny model directory, and its one-line errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from sinkscope.cli.__main__ import main
from sinkscope.inputs import random_inputs, text_inputs
from sinkscope.models.random_hf import save_tiny, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny") / "llama"), "llama")


def _eager_alpha(model_dir: str, sequences: list[list[int]]) -> np.ndarray:
    """(N, L, H, T) alpha from eager ``output_attentions``: the mean attention each key gets from the queries that
    see it (the plain computation the profile's fused statistics must match)."""
    from sinkscope.models.load import load_model

    model, _ = load_model(model_dir, attn_implementation="eager")
    out = []
    for seq in sequences:
        with torch.no_grad():
            att = model(input_ids=torch.tensor([seq]), output_attentions=True).attentions  # L x (1, H, T, T)
        a = torch.stack([x[0] for x in att]).double()  # (L, H, T, T)
        T = len(seq)
        out.append((a.sum(dim=2) / torch.arange(T, 0, -1, dtype=torch.float64)).numpy())  # key k: T - k queries
    return np.stack(out)


def test_scan_matches_eager_attention(model_dir, tmp_path) -> None:
    out = tmp_path / "scan"
    rc = main(["scan", "--model", model_dir, "--random", "24", "--samples", "3", "--out", str(out), "--bos", "always"])
    assert rc == 0
    prof = json.loads((out / "profile.json").read_text())
    seqs = random_inputs(tiny_tokenizer(), 24, 3, bos="always", seed=0).sequences
    alpha = _eager_alpha(model_dir, seqs)  # (3, 2, 4, 25)
    np.testing.assert_allclose(prof["alpha_0"], alpha[..., 0].mean(0), atol=1e-5)
    assert prof["sink_ratio"] == pytest.approx(float((alpha[..., 0] > 0.3).mean()), abs=1e-12)
    np.testing.assert_allclose(prof["sink_ratio_by_position"], (alpha > 0.3).mean(axis=(0, 1, 2)), atol=1e-12)
    assert (prof["inputs"]["bos"], prof["inputs"]["bos_prepended"]) == ("always", True)  # written once
    assert "bos" not in prof and "versions" not in prof["inputs"] and prof["versions"]["transformers"]
    assert prof["inputs"]["lengths"] == [25, 25, 25]
    assert prof["qk_alignment"]["positions"] == [p["position"] for p in prof["top_sinks"][:3]]
    rows = list(csv.DictReader((out / "heads.csv").open()))
    assert [(int(r["layer"]), int(r["head"])) for r in rows] == [(l, h) for l in range(2) for h in range(4)]
    np.testing.assert_allclose([float(r["alpha_0"]) for r in rows], np.ravel(prof["alpha_0"]), rtol=1e-12)
    for name in ("sink_heatmap.png", "residual_norm_by_layer.png", "attention_on_first_by_layer.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_known_sink_ratio_on_a_model_whose_first_layer_attends_uniformly(tmp_path, capsys) -> None:
    """Zero query weights in layer 0 make every head there attend uniformly over the keys it sees, so alpha_0 of
    a T-token input is H_T / T exactly (the harmonic number): for T = 8 that is 0.3397, a sink at eps 0.3 and
    not at eps 0.35. Layer 1 stays random and is checked against eager attention."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.zero_()
    d = tmp_path / "uniform"
    model.save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    text = "the cat sat on the mat and"  # 7 words + BOS = 8 tokens
    expected_alpha0 = sum(1 / t for t in range(1, 9)) / 8
    eager = _eager_alpha(str(d), text_inputs(tiny_tokenizer(), [text], bos="always").sequences)[0]  # (L, H, T)
    np.testing.assert_allclose(eager[0, :, 0], expected_alpha0, atol=1e-6)  # the construction holds
    for eps, layer0_sinks in ((0.3, 4), (0.35, 0)):
        out = tmp_path / f"eps{eps}"
        assert main(["scan", "--model", str(d), "--text", text, "--bos", "always", "--eps", str(eps),
                     "--out", str(out)]) == 0
        prof = json.loads((out / "profile.json").read_text())
        assert prof["inputs"]["lengths"] == [8]
        np.testing.assert_allclose(prof["alpha_0"][0], [expected_alpha0] * 4, atol=1e-6)
        assert prof["sink_ratio_first_by_layer"][0] == layer0_sinks / 4
        assert prof["sink_ratio"] == pytest.approx((layer0_sinks + int((eager[1, :, 0] > eps).sum())) / 8)
        captured = capsys.readouterr()
        assert f"Sink_0^{eps} = {prof['sink_ratio']:.3f}" in captured.out
        assert "profiling: 2/2 layers, 100%" in captured.err  # progress as plain lines when not on a terminal


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
    for dtype in ("bfloat16", "float32"):
        assert main(["scan", "--model", model_dir, "--random", "12", "--out", str(tmp_path / dtype), "--dtype", dtype,
                     "--device", "cpu"]) == 0
    bf16, fp32 = (json.loads((tmp_path / d / "profile.json").read_text()) for d in ("bfloat16", "float32"))
    np.testing.assert_allclose(bf16["alpha_0"], fp32["alpha_0"], atol=0.02)  # the same heads, in bf16's precision
    assert bf16["alpha_0"] != fp32["alpha_0"]  # and the bf16 model was really used
    capsys.readouterr()
    for args, message in ((["--device", "gpu"], "--device 'gpu' is not a device"),
                          (["--dtype", "int4"], "--dtype 'int4'"),
                          (["--revision", "main"], "--revision applies to hub models")):
        assert main(["scan", "--model", model_dir, "--random", "12", "--out", str(tmp_path / "x"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err


def test_ctrl_c_exits_130_without_a_resume_hint(model_dir, tmp_path, monkeypatch, capsys) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("sinkscope.models.load.load_model", interrupted)
    assert main(["scan", "--model", model_dir, "--random", "12", "--out", str(tmp_path / "x")]) == 130
    err = capsys.readouterr().err
    assert "interrupted; nothing half-written" in err and "resume" not in err  # scan does not resume
    assert not (tmp_path / "x").exists()  # the directory the job made is gone with it
