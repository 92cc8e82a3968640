"""The first token's attention-logit gap (`training.metrics.bos_logit_gap`, Guo et al.'s mutual reinforcement) on
models and logits built so that the gap is known, and the log-step fit of `training.metrics.reinforcement_dynamics`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sinkscope.models.tinygpt import TinyGPT, TinyGPTConfig, attention_mask
from sinkscope.tasks.batch import LMBatch
from sinkscope.training.metrics import bos_logit_gap, measure_model


def test_gap_on_hand_written_logits() -> None:
    """Query t: z[t, 0] = 3 + t, z[t, k] = k for the others (mean (t + 1) / 2): gap = 3 + t - (t + 1) / 2."""
    T = 5
    z = torch.zeros(1, 1, T, T)
    for t in range(T):
        z[0, 0, t, 0] = 3.0 + t
        for k in range(1, t + 1):
            z[0, 0, t, k] = float(k)
        z[0, 0, t, t + 1:] = 1e6  # invisible keys must not count
    queries = torch.tensor([[False, True, False, True, True]])  # t = 1, 3, 4
    gap, gap_lse = bos_logit_gap(z, attention_mask(T), queries)
    want = np.mean([3 + t - (t + 1) / 2 for t in (1, 3, 4)])
    want_lse = np.mean([3 + t - math.log(sum(math.exp(k) for k in range(1, t + 1))) for t in (1, 3, 4)])
    assert gap.item() == pytest.approx(want, abs=1e-12)
    assert gap_lse.item() == pytest.approx(want_lse, abs=1e-12)


def test_gap_without_qualifying_queries_is_nan() -> None:
    z = torch.randn(1, 2, 3, 3)
    gap, _ = bos_logit_gap(z, attention_mask(3), torch.tensor([[True, False, False]]))  # t = 0 sees no other key
    assert torch.isnan(gap).all()


def _constructed_model(c: float, u1: float, T: int) -> TinyGPT:
    """One layer, one head of width 4 whose logits are known: every query is ``q = (u1, 0, 0, 0)``; BOS's key is
    ``(c, 0, 0, 0)``, every other token's ``(-c, 0, 0, 0)``. Token 0 is BOS, embedding ``(1, -1, 0, 0)``; every
    other token ``(0, 0, 1, -1)``; no positions. LayerNorm (no affine bias, weight 1) makes them
    ``(r, -r, 0, 0)`` and ``(0, 0, r, -r)``, ``r = sqrt(2)``. So z[t, 0] = c u1 / 2, z[t, k] = -c u1 / 2."""
    cfg = TinyGPTConfig(vocab_size=5, block_size=T, n_layers=1, d_model=4, n_heads=1, positions="none")
    model = TinyGPT(cfg).eval()
    r = math.sqrt(2.0)
    with torch.no_grad():
        model.tok_emb.weight.zero_()
        model.tok_emb.weight[0] = torch.tensor([1.0, -1.0, 0.0, 0.0])
        model.tok_emb.weight[1:] = torch.tensor([0.0, 0.0, 1.0, -1.0])
        w = model.layers[0].attn.qkv.weight  # (3 * 4, 4): rows of q, k, v
        w.zero_()
        ones = torch.tensor([1.0, -1.0, 1.0, -1.0]) / (2 * r)  # . normalised input = 1 for every token
        sign = torch.tensor([1.0, -1.0, -1.0, 1.0]) / (2 * r)  # +1 on BOS, -1 on the others
        w[0] = u1 * ones  # q = (u1, 0, 0, 0)
        w[4] = c * sign  # k = (+-c, 0, 0, 0)
        w[8:] = torch.randn(4, 4)  # values: anything
    return model


@pytest.mark.parametrize("c,u1", [(2.0, 3.0), (-1.5, 4.0)])
def test_measure_model_gap_on_a_constructed_model(c: float, u1: float) -> None:
    T = 8
    model = _constructed_model(c, u1, T)
    idx = torch.tensor([[0, 1, 2, 3, 4, 1, 2, 3], [0, 4, 4, 4, 3, 2, 1, 1]])
    non_trigger = torch.ones_like(idx, dtype=torch.bool)
    non_trigger[:, 0] = False
    trigger = torch.zeros_like(non_trigger)
    trigger[0, 3] = True  # one query: t = 3
    batch = LMBatch(idx, idx.roll(-1, 1), torch.ones_like(idx, dtype=torch.bool),
                    classes={"non_trigger": non_trigger, "trigger": trigger})
    row = measure_model(model, batch, dormant_threshold=0.5)
    shrink = 1.0 / (math.sqrt(2.0) * math.sqrt(0.5 + 1e-5))  # LayerNorm's eps: |normalised| = r * shrink
    gap_known = (c * u1 / 2 - (-c * u1 / 2)) * shrink**2  # d_head 4: 1 / sqrt(4) = 1 / 2
    assert row["bos_logit_gap"]["non_trigger"][0][0] == pytest.approx(gap_known, abs=1e-4)
    # log-sum-exp of t equal logits -c u1 / 2: gap - log t, averaged over t = 1..7 (both rows)
    lse_known = gap_known - np.mean([math.log(t) for t in range(1, T)])
    assert row["bos_logit_gap_lse"]["non_trigger"][0][0] == pytest.approx(lse_known, abs=1e-4)
    assert row["bos_logit_gap_lse"]["trigger"][0][0] == pytest.approx(gap_known - math.log(3), abs=1e-4)
    # and softmax's log-odds of the attention on BOS the model used (its captured weights), independently
    a0 = 1.0 / (1.0 + np.arange(1, T) * math.exp(-gap_known))
    assert row["bos_logit_gap_lse"]["non_trigger"][0][0] == pytest.approx(np.mean(np.log(a0 / (1 - a0))), abs=1e-4)


def test_gap_matches_softmax_weights_of_a_random_model() -> None:
    """For softmax, log A[t, 0] - mean_k log A[t, k] is the mean gap and log(A0 / (1 - A0)) the log-sum-exp gap:
    computed here from the weights the layers used (capture points), not from q and k."""
    from sinkscope.collectors.tinygpt import capture_tinygpt

    torch.manual_seed(1)
    model = TinyGPT(TinyGPTConfig(vocab_size=7, block_size=12, n_layers=2, d_model=16, n_heads=2,
                                  positions="rope")).eval()
    with torch.no_grad():
        model.tok_emb.weight.mul_(3)
    idx = torch.randint(0, 7, (3, 12))
    queries = torch.rand(3, 12) > 0.3
    batch = LMBatch(idx, idx.roll(-1, 1), torch.ones_like(idx, dtype=torch.bool), classes={"q": queries})
    row = measure_model(model, batch)
    with torch.no_grad(), capture_tinygpt(model) as cap:
        model(idx)
    use = queries.clone()
    use[:, 0] = False
    for layer, w in enumerate(cap.weights):  # (B, H, Q, K)
        logw = w.double().log()
        mean_gap, lse_gap = [], []
        for b, t in use.nonzero().tolist():
            mean_gap.append(logw[b, :, t, 0] - logw[b, :, t, 1:t + 1].mean(-1))
            a0 = w[b, :, t, 0].double()
            lse_gap.append((a0 / (1 - a0)).log())
        assert row["bos_logit_gap"]["q"][layer] == pytest.approx(torch.stack(mean_gap).mean(0).tolist(), abs=2e-4)
        assert row["bos_logit_gap_lse"]["q"][layer] == pytest.approx(torch.stack(lse_gap).mean(0).tolist(),
                                                                     abs=2e-4)


def _rows(steps: list[int], gap: list[float], mass: list[float], value: list[float]) -> list[dict]:
    """Metrics rows of a 2-layer, 1-head run whose layer-1 head carries the given series (layer 0: noise)."""
    return [{"step": s, "bos_logit_gap": {"non_trigger": [[0.1], [g]], "trigger": [[0.0], [-g]]},
             "bos_logit_gap_lse": {"non_trigger": [[0.0], [g - 3]], "trigger": [[0.0], [-g]]},
             "head_bos_mass": {"L0H0": {"non_trigger": 0.05}, "L1H0": {"non_trigger": m}},
             "bos_value_out_norm": [[1.0], [v]]} for s, g, m, v in zip(steps, gap, mass, value)]


def test_log_step_fit_recovers_a_known_slope_and_a_poor_r2() -> None:
    from sinkscope.training.metrics import linear_step_r2, log_step_fit

    steps = [250, 500, 1000, 2000, 4000, 8000]
    fit = log_step_fit(steps, [1.5 + 0.8 * math.log(s) for s in steps])
    assert fit.slope == pytest.approx(0.8, abs=1e-9) and fit.intercept == pytest.approx(1.5, abs=1e-9)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12) and fit.slope_per_decade == pytest.approx(0.8 * math.log(10))
    lin = log_step_fit(steps, [1e-3 * s for s in steps])  # linear in step: a log fit leaves a visible residual
    assert 0.5 < lin.r2 < 0.95
    assert linear_step_r2(steps, [1e-3 * s for s in steps]) == pytest.approx(1.0, abs=1e-12)


def test_reinforcement_dynamics_picks_the_sink_head_and_fits_from_onset() -> None:
    from sinkscope.training.metrics import reinforcement_dynamics

    steps = [0, 250, 500, 1000, 2000, 4000, 8000]
    # before the onset (mass <= 0.89) the gap jumps; from step 500 on it is 2 + 1.25 ln(step) exactly
    gap = [0.0, 20.0] + [2 + 1.25 * math.log(s) for s in steps[2:]]
    mass = [0.05, 0.5, 0.92, 0.95, 0.97, 0.98, 0.99]
    value = [1.0, 0.6, 0.3, 0.2, 0.15, 0.12, 0.1]
    d = reinforcement_dynamics(_rows(steps, gap, mass, value), run="demo")
    assert (d.layer, d.head, d.onset_step) == (1, 0, 500)
    assert d.fit.slope == pytest.approx(1.25, abs=1e-9) and d.fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert (d.fit.first_step, d.fit.n) == (500, 5)
    assert d.fit_all.r2 < 0.9  # the pre-onset jump spoils the fit over every step
    assert (d.value_start, d.value_end) == (0.3, 0.1)
    assert 0.5 < d.linear_r2 < 0.95  # a log curve over 1.2 decades is visibly not a straight line in the step


def test_reinforcement_cli_writes_json_and_figure(tmp_path) -> None:
    import json

    from typer.testing import CliRunner

    from sinkscope.cli.train import app

    run = tmp_path / "run"
    run.mkdir()
    steps = [0, 250, 500, 1000, 2000]
    rows = _rows(steps, [0.0, 1.0, 2.0, 3.0, 4.0], [0.0, 0.95, 0.96, 0.97, 0.98], [1.0, 0.5, 0.4, 0.3, 0.2])
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = CliRunner().invoke(app, ["reinforcement", str(run), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "out" / "reinforcement.json").read_text())
    assert saved["fit"]["first_step"] == 250 and saved["fit"]["slope"] == pytest.approx(1 / math.log(2), rel=1e-6)
    assert (tmp_path / "out" / "reinforcement.png").stat().st_size > 10_000
    res = CliRunner().invoke(app, ["reinforcement", str(run), "--out", str(tmp_path / "o2"), "--class", "copy"])
    assert res.exit_code != 0 and "no query class 'copy'" in str(res.exception)
