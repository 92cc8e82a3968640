"""Position probes (`sinkscope.training.positions`) on a tinygpt built so that every query attends to one marker
token, wherever it is: the sink must be found exactly where the probe put the marker."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkscope.errors import InputError
from sinkscope.models.tinygpt import TinyGPT, TinyGPTConfig
from sinkscope.training.positions import position_profile, probe_rows

MARKER, BOS, VOCAB, T = 0, 9, 10, 16


def marker_model() -> TinyGPT:
    """One softmax head, no positions: every token's embedding has a 1 in dim 0, the marker also in dim 1; the
    query reads dim 0 and the key dim 1, so the marker's logit is ~30 and every other key's 0."""
    cfg = TinyGPTConfig(vocab_size=VOCAB, block_size=T, n_layers=1, d_model=4, n_heads=1, mlp=False,
                        norm="rmsnorm", positions="none")
    model = TinyGPT(cfg)
    with torch.no_grad():
        emb = torch.zeros(VOCAB, 4)
        emb[:, 0] = 1.0
        emb[:, 2:] = torch.randn(VOCAB, 2, generator=torch.Generator().manual_seed(0)) * 0.3
        emb[MARKER, 1] = 1.0
        model.tok_emb.weight.copy_(emb)
        qkv = torch.zeros(12, 4)
        qkv[0, 0] = 10.0  # q[0] = 10 * x[0]
        qkv[4, 1] = 10.0  # k[0] = 10 * x[1]
        qkv[8:, :] = torch.eye(4)
        model.layers[0].attn.qkv.weight.copy_(qkv)
    return model.eval()


def text_rows(n: int) -> torch.Tensor:
    return torch.randint(1, BOS, (n, T), generator=torch.Generator().manual_seed(1))  # no marker, no BOS


def test_sink_is_where_the_marker_is() -> None:
    model, rows = marker_model(), text_rows(40)
    plain = position_profile(model, rows)
    assert plain.sink.max() == 0  # uniform attention: alpha_0 = H(16)/16 = 0.21 < 0.3
    np.testing.assert_allclose(plain.alpha_max_head[0], sum(1 / (t + 1) for t in range(T)) / T, atol=1e-4)
    fixed = position_profile(model, probe_rows(rows, "fixed", vocab_size=VOCAB, bos_id=BOS, fixed_pos=5,
                                               fixed_token=MARKER))
    assert fixed.sink[5] == 1.0 and np.delete(fixed.sink, 5).max() == 0
    assert fixed.alpha_max_head[5] > 0.99


def test_random_token_at_zero_sinks_only_when_it_draws_the_marker() -> None:
    model, rows = marker_model(), text_rows(400)
    probed = probe_rows(rows, "random0", vocab_size=VOCAB, bos_id=BOS, seed=3)
    first = probed[:, 0]
    assert not (first == BOS).any() and len(set(first.tolist())) == VOCAB - 1
    assert torch.equal(probed[:, 1:], rows[:, 1:])
    prof = position_profile(model, probed)
    assert prof.sink[0] == pytest.approx(float((first == MARKER).float().mean()))  # 1 head: a row's share is 0 or 1
    assert 0 < prof.sink[0] < 0.3


def test_probe_rows_refuses_bad_requests() -> None:
    with pytest.raises(InputError, match="unknown probe"):
        probe_rows(text_rows(2), "shuffle", vocab_size=VOCAB, bos_id=BOS)
    with pytest.raises(InputError, match="outside rows"):
        probe_rows(text_rows(2), "fixed", vocab_size=VOCAB, bos_id=BOS, fixed_pos=T)
