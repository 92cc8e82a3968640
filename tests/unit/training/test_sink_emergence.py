"""Guo et al.'s finding on Bigram-Backcopy, trained here: softmax attention with Adam forms a first-token sink,
ReLU attention does not (it can output zero, so a head with nothing to do needs no sink).

configs/bb-base.yaml scaled down to ~20 s per run on one core: width 32, length 32, batch 32, lr 3e-3, 300
steps (measured: softmax Sink_0 0 at step 100, 0.67 / 0.81 / 0.73 at steps 200 / 250 / 300, copy loss 0.13;
ReLU Sink_0 0 at every step, copy loss 0.27 and falling).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sinkscope.training.config import load_config
from sinkscope.training.loop import train

ROOT = Path(__file__).resolve().parents[3]
SMALL = ["model.d_model=32", "model.block_size=32", "data.seq_len=32", "data.batch_size=32",
         "data.eval_batch_size=64", "optim.lr=3e-3", "train.steps=300", "train.eval_every=50",
         "train.ckpt_every=1000", "train.plots=false", "train.threads=1"]


@pytest.mark.slow
def test_softmax_adam_forms_the_first_token_sink_and_relu_attention_does_not(tmp_path: Path) -> None:
    runs = {kind: train(load_config(ROOT / "configs" / "bb-base.yaml", [*SMALL, f"model.attention={kind}"]),
                        tmp_path / kind) for kind in ("softmax", "relu")}
    for kind, res in runs.items():  # both learn the task: the copy after a trigger is what attention is for
        assert res.rows[0]["loss_copy"] > 4.0 and res.final["loss_copy"] < 0.5, kind
        assert res.rows[0]["sink_ratio"] == 0.0, kind  # no sink at initialisation
        assert res.final["step"] == 300

    softmax = runs["softmax"].rows
    late = softmax[-3:]  # steps 200, 250, 300
    assert sum(r["sink_ratio"] for r in late) / 3 > 0.5  # the sink formed: Sink_0 (eps 0.3) from 0
    assert min(r["bos_attention"][1][0] for r in late) > 0.3  # layer 1's head parks its attention on BOS

    relu = runs["relu"].rows
    assert all(r["sink_ratio"] == 0.0 for r in relu)  # from the weights used: never a sink
    assert max(r["sink_ratio_proxy"] for r in relu) < 0.1  # nor in Gu et al.'s row-normalised proxy
    assert max(r["bos_attention"][1][0] for r in relu[-3:]) < 0.2
