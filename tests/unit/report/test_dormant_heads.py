"""Active vs dormant heads: golden classification, parity of the sink mass with eager attention, domains."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkscope.analyses.dormant import DormancyReport, find_dormant_heads
from sinkscope.capture import attention_probs_eager
from sinkscope.errors import InputError
from sinkscope.inputs import TokenBatch
from sinkscope.models.random_hf import tiny_model, tiny_tokenizer


def test_golden_classification_and_ranking() -> None:
    sink = np.array([[[0.9, 0.1, 0.9]], [[0.8, 0.2, 0.1]]])  # (D=2, La=1, H=3)
    out = np.array([[[1.0, 2.0, 0.5]], [[1.0, 2.0, 2.0]]])
    rep = DormancyReport(domains=["text", "code"], attention_layers=[0], alpha0=sink, out_norm=out,
                         threshold=0.5)
    assert rep.classify().tolist() == [["dormant", "active", "switching"]]
    np.testing.assert_allclose(rep.dependence(), [[0.1, 0.1, 0.8]])
    np.testing.assert_allclose(rep.out_norm_ratio(), [[1.0, 1.0, 4.0]])
    rows = rep.rows()
    assert [r["head"] for r in rows] == [2, 0, 1]  # most domain-dependent first, ties by (layer, head)
    assert rows[0]["most_dormant_on"] == "text" and rows[0]["most_active_on"] == "code"
    assert rows[0]["alpha0_code"] == pytest.approx(0.1)
    s = rep.summary()
    assert (s["n_dormant"], s["n_active"], s["n_switching"]) == (1, 1, 1)
    assert s["dormant_share"] == {"text": pytest.approx(2 / 3), "code": pytest.approx(1 / 3)}
    assert [r["head"] for r in rep.switching_heads()] == [2]
    assert rep.to_json()["summary"]["most_dependent"]["head"] == 2


def _batch(seed: int, n: int = 3, T: int = 12) -> TokenBatch:
    g = torch.Generator().manual_seed(seed)
    return TokenBatch(torch.randint(4, 99, (n, T), generator=g).tolist(), "ids")


def test_sink_mass_equals_eager_attention_on_token_0() -> None:
    model = tiny_model("llama")
    domains = {"a": _batch(1), "b": _batch(2, T=9)}
    calls = []
    rep = find_dormant_heads(model, None, domains, batch_size=2, progress=lambda d, t: calls.append((d, t)))
    assert rep.domains == ["a", "b"] and rep.alpha0.shape == (2, 2, 4) and rep.out_norm.shape == (2, 2, 4)
    for d, batch in enumerate(domains.values()):
        ids = torch.tensor(batch.sequences)
        A = torch.stack(attention_probs_eager(model, ids)).double()  # (La, B, H, Q, K)
        T = ids.shape[1]
        alpha0 = (A[..., 0].sum(-1) / T).mean(1)  # mean over queries (all see key 0), then samples: (La, H)
        np.testing.assert_allclose(rep.alpha0[d], alpha0.numpy(), atol=1e-5)
    assert (rep.out_norm > 0).all()
    assert calls[-1][0] == calls[-1][1] == 2 * 2 * 2  # 2 domains x 2 batches x 2 layers
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)


def test_builtin_domains_with_a_tokenizer() -> None:
    rep = find_dormant_heads(tiny_model("llama"), tiny_tokenizer(), ("text", "code", "random"), n_tokens=16,
                             samples=2)
    assert rep.domains == ["text", "code", "random"] and set(rep.profiles) == {"text", "code", "random"}
    assert rep.profiles["random"].inputs["kind"] == "random" and max(rep.profiles["text"].lengths) <= 16
    assert len(rep.rows()) == 2 * 4


def test_bad_domains() -> None:
    model = tiny_model("llama")
    with pytest.raises(InputError, match="at least two"):
        find_dormant_heads(model, tiny_tokenizer(), ("text",))
    with pytest.raises(InputError, match="unknown input domain 'prose'"):
        find_dormant_heads(model, tiny_tokenizer(), ("text", "prose"))
