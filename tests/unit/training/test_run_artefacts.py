"""Training runs as artefacts: checkpoints read with weights_only=True (a pickled object is refused before it
runs), and `sinkscope scan --model RUN_DIR` profiling a trained tinygpt like any model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from sinkscope.cli.__main__ import main
from sinkscope.training.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from sinkscope.training.config import config_from_dict
from sinkscope.training.loop import train
from sinkscope.training.run import load_trained

from .conftest import tiny_dict


class _Payload:
    """Unpickling this runs ``os.system``: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def run_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = config_from_dict(tiny_dict(corpus, model={"attention": "sigmoid", "attn_bias": "k"},
                                     train={"steps": 5, "eval_every": 5, "ckpt_every": 5}))
    out = tmp_path_factory.mktemp("run") / "run"
    train(cfg, out)
    return out


def test_checkpoint_with_a_pickled_object_is_refused_before_it_runs(run_dir: Path, tmp_path: Path) -> None:
    good = torch.load(run_dir / CHECKPOINT_NAME, weights_only=True)  # what the loop writes loads safely
    assert good["step"] == 5
    marker = tmp_path / "pwned"
    bad_run = tmp_path / "bad"
    bad_run.mkdir()
    (bad_run / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    torch.save({**good, "extra": _Payload(marker)}, bad_run / CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match=r"holds pickled Python objects \(posix.system\), which are refused") as e:
        load_trained(bad_run)
    assert "\n" not in str(e.value)
    assert not marker.exists()  # nothing was executed
    with pytest.raises(CheckpointError):
        load_checkpoint(bad_run / CHECKPOINT_NAME, {})
    assert not marker.exists()


def test_scan_profiles_a_run_directory(run_dir: Path, tmp_path: Path) -> None:
    from sinkscope.models.load import load_model
    from sinkscope.profile import profile_sinks

    out = tmp_path / "scan"
    assert main(["scan", "--model", str(run_dir), "--text", "the cat sat", "--out", str(out)]) == 0
    got = json.loads((out / "profile.json").read_text())
    assert got["model"]["model_type"] == "tinygpt" and got["model"]["attention"] == "sigmoid"
    assert got["model"]["source"]["kind"] == "manifest" and "sink_ratio_proxy" in got
    assert (out / "heads.csv").is_file()
    model, tok = load_model(run_dir)
    ids = tok("the cat sat")["input_ids"]
    assert ids[0] == tok.bos_token_id and got["inputs"]["lengths"] == [len(ids)]
    prof = profile_sinks(model, [ids])
    assert got["sink_ratio"] == prof.sink_ratio(0)
    np.testing.assert_allclose(got["alpha_0"], prof.alpha_mean(0), atol=1e-9)
