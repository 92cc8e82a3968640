"""The profiler on the real SmolLM2-135M-Instruct: its first token is a sink with a residual peak."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sinkscope.capture import attention_probs_eager
from sinkscope.cli.__main__ import main
from sinkscope.inputs import random_inputs, repeat_inputs, text_inputs
from sinkscope.profile import profile_sinks

pytestmark = pytest.mark.slow

ENGLISH = [
    "The cat sat on the warm windowsill and watched the birds in the garden below.",
    "Scientists have discovered a new species of frog in the rainforests of South America.",
    "She opened the old wooden box and found a bundle of letters tied with a blue ribbon.",
    "The train to London leaves at nine o'clock every morning from the central station.",
]


def test_first_token_is_a_sink_with_a_residual_peak(smollm2) -> None:
    model, tok = smollm2
    prof = profile_sinks(model, text_inputs(tok, ENGLISH))
    assert not prof.inputs["bos_prepended"]  # SmolLM2's tokenizer adds no BOS: the first real token is the sink
    assert prof.sink_ratio(0) > 0.8
    assert prof.top_sinks(1)[0]["position"] == 0
    assert np.nanmax(prof.residual_ratio()) > 5.0
    assert np.nanmax(prof.residual_ratio()) > 50.0  # the ~150x massive-activation peak of the middle layers
    big = [m for m in prof.massive if m["massive"]]
    assert big and all(e["position"] == 0 for m in big for e in m["top"][:1])
    # value drain: in most layers the sink's values are smaller than the median token's
    assert np.nanmedian(prof.value_ratio()) < 0.5


def test_profile_equals_eager_on_smollm2(smollm2) -> None:
    model, tok = smollm2
    batch = text_inputs(tok, ENGLISH[:2])
    prof = profile_sinks(model, batch, batch_size=2)
    for i, seq in enumerate(batch.sequences):
        A = torch.stack(attention_probs_eager(model, torch.tensor([seq])))[:, 0].double()
        ref = (A.sum(2) / torch.arange(len(seq), 0, -1, dtype=torch.float64)).numpy()
        assert np.abs(prof.alpha[i, :, :, : len(seq)] - ref).max() < 1e-5


def test_repeated_and_random_inputs(smollm2) -> None:
    model, tok = smollm2
    rep = profile_sinks(model, repeat_inputs(tok, "poem", 128))
    # in a long run of one token every position's residual norm matches the first token's (RESEARCH.md section 3)
    late = rep.residual_norm[0, 12, 64:128] / rep.residual_norm[0, 12, 0]
    assert np.all(np.abs(late - 1) < 0.25)
    rnd = profile_sinks(model, random_inputs(tok, 64, 4, seed=0))
    assert rnd.sink_ratio(0) > 0.5


def test_scan_cli_on_smollm2(tmp_path) -> None:
    out = tmp_path / "scan"
    assert main(["scan", "--model", "smollm2-135m", "--text", ENGLISH[0], "--out", str(out)]) == 0
    prof = json.loads((out / "profile.json").read_text())
    assert prof["sink_ratio"] > 0.8 and prof["model"]["source"]["kind"] == "alias"
