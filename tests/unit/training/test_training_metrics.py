"""Training metrics: Sink_0 from weights and proxy, slot share, norm ratios, active/dormant labels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sinkscope.models.tinygpt import TinyGPT, TinyGPTConfig
from sinkscope.tasks.bigram_backcopy import BigramBackcopy
from sinkscope.training.metrics import measure_model, norm_ratio, sink_ratio


def test_sink_ratio_and_norm_ratio() -> None:
    alpha = torch.tensor([[0.9, 0.1], [0.31, 0.3]])  # (L, H)
    assert sink_ratio(alpha, eps=0.3) == pytest.approx(0.5)
    per_sample = torch.tensor([[[0.9, 0.1], [0.2, 0.1]]])  # (L=1, B=2, H=2): the indicator is averaged
    assert sink_ratio(per_sample, eps=0.3) == pytest.approx(0.25)
    x = torch.ones(2, 5, 4)
    x[:, 0] *= 10
    assert norm_ratio(x) == pytest.approx(10.0)


@pytest.mark.parametrize("kw,slot", [({"attention": "relu"}, False), ({"sink_token": True}, True),
                                      ({"attention": "softmax1"}, True), ({"attn_bias": "kv"}, True)])
def test_measure_model_rows(corpus: Path, kw: dict, slot: bool) -> None:
    task = BigramBackcopy.from_file(corpus, n_chars=20, n_triggers=2)
    model = TinyGPT(TinyGPTConfig(vocab_size=task.vocab_size, block_size=16, n_layers=2, d_model=16, n_heads=2, **kw))
    row = measure_model(model, task.batch(0, 0, 4, 16), eps=0.3)
    assert ("sink_ratio_slot" in row) == slot
    assert len(row["bos_attention"]) == 2 and len(row["bos_value_norm"]) == 2 and len(row["bos_residual_norm"]) == 2
    assert set(row["heads"]) == {"L0H0", "L0H1", "L1H0", "L1H1"}
    assert all(v in ("active", "dormant") for labels in row["heads"].values() for v in labels.values())
    if kw.get("attention") == "relu":  # weights used are not rows summing to one; the proxy renormalises them
        assert row["bos_attention"] != row["bos_attention_proxy"]


def test_absolute_residual_norms_match_the_ratio(corpus: Path) -> None:
    task = BigramBackcopy.from_file(corpus, n_chars=20, n_triggers=2)
    model = TinyGPT(TinyGPTConfig(vocab_size=task.vocab_size, block_size=16, n_layers=3, d_model=16, n_heads=2))
    row = measure_model(model, task.batch(0, 0, 8, 16))
    assert len(row["bos_residual_abs"]) == len(row["median_residual_abs"]) == 3
    for ratio, bos, med in zip(row["bos_residual_norm"], row["bos_residual_abs"], row["median_residual_abs"]):
        assert bos > 0 and med > 0 and ratio == pytest.approx(bos / med, rel=1e-3)


def test_relu_flat_divides_every_row_alike() -> None:
    from sinkscope.models.attention import ATTENTION_FNS

    q, k = torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    mask = torch.ones(5, 5).tril().bool()
    relu, flat = ATTENTION_FNS["relu"](q, k, mask), ATTENTION_FNS["relu_flat"](q, k, mask)
    n_visible = torch.arange(1, 6, dtype=torch.float32)[:, None]  # 1 / (t + 1) for relu, 1 / 5 for every flat row
    torch.testing.assert_close(flat * 5, relu * n_visible)
    assert (flat[..., ~mask] == 0).all()


@pytest.mark.parametrize("kind", ["softmax", "sigmoid_norm"])
def test_score_budget_share_is_the_weight_used(corpus: Path, kind: str) -> None:
    from sinkscope.training.diagnose import score_budget
    from sinkscope.training.metrics import capture_tinygpt

    task = BigramBackcopy.from_file(corpus, n_chars=20, n_triggers=2)
    torch.manual_seed(0)
    model = TinyGPT(TinyGPTConfig(vocab_size=task.vocab_size, block_size=16, n_layers=2, d_model=16, n_heads=2,
                                  attention=kind, positions="rope")).eval()
    batch = task.batch(0, 0, 8, 16)
    budget = score_budget(model, batch, layer=1, buckets=1)
    with torch.no_grad(), capture_tinygpt(model) as cap:
        model(batch.idx)
    used = cap.weights[1][..., 0]  # (B, H, T): weight on the first token as the model used it
    for cls, rows in budget["classes"].items():
        sel = batch.classes[cls].clone()
        sel[:, 0] = False  # the buckets cover query positions 1..T-1
        expected = used[sel[:, None, :].expand_as(used)].mean()
        assert rows[0]["share_first"] == pytest.approx(float(expected), abs=2e-4)


def test_residual_parts_output_ratio_is_the_metrics_ratio(corpus: Path) -> None:
    from sinkscope.training.diagnose import residual_parts

    task = BigramBackcopy.from_file(corpus, n_chars=20, n_triggers=2)
    model = TinyGPT(TinyGPTConfig(vocab_size=task.vocab_size, block_size=16, n_layers=2, d_model=16,
                                  attention="relu")).eval()
    batch = task.batch(0, 0, 8, 16)
    parts = residual_parts(model, batch, layer=0)["parts"]
    assert set(parts) == {"input", "attention", "mlp", "output"}
    row = measure_model(model, batch)
    assert parts["output"]["ratio"] == pytest.approx(row["bos_residual_norm"][0], abs=2e-3)
    assert parts["output"]["first"] == pytest.approx(row["bos_residual_abs"][0], abs=2e-3)


@pytest.mark.parametrize("kw", [{"attention": "softmax"}, {"attn_bias": "k"}, {"attention": "relu"}])
def test_attention_targets_shares_sum_to_one(corpus: Path, kw: dict) -> None:
    from sinkscope.training.diagnose import attention_targets

    task = BigramBackcopy.from_file(corpus, n_chars=20, n_triggers=2)
    model = TinyGPT(TinyGPTConfig(vocab_size=task.vocab_size, block_size=16, n_layers=2, d_model=16, n_heads=2,
                                  **kw)).eval()
    out = attention_targets(model, task.batch(0, 0, 8, 16), layer=1)
    for shares in out["classes"].values():
        if kw.get("attention") == "relu":  # a ReLU row can be all zero: it then attends nowhere
            assert 0 < sum(shares.values()) <= 1 + 2e-3
        else:
            assert sum(shares.values()) == pytest.approx(1.0, abs=2e-3)  # rows of the proxy sum to one
        assert (shares["slot"] > 0) == (kw.get("attn_bias") == "k")
