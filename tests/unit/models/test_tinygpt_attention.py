"""tinygpt and its attention registry: parity with a plain reference and with HF Llama, kinds, capture points."""

from __future__ import annotations

import math

import pytest
import torch

from sinkscope.collectors.tinygpt import capture_tinygpt
from sinkscope.errors import InputError
from sinkscope.metrics.sink import column_alpha, row_normalised
from sinkscope.models.attention import ATTENTION_FNS
from sinkscope.models.tinygpt import TinyGPT, TinyGPTConfig, attention_mask


def _cfg(**kw) -> TinyGPTConfig:
    base = dict(vocab_size=13, block_size=10, n_layers=2, d_model=16, n_heads=2)
    return TinyGPTConfig(**{**base, **kw})


def test_softmax_weights_equal_plain_reference() -> None:
    model = TinyGPT(_cfg(positions="learned")).eval()
    idx = torch.randint(0, 13, (3, 10))
    with capture_tinygpt(model) as cap:
        model(idx)
    # reference for layer 0, written out by hand
    attn = model.layers[0].attn
    x = model.tok_emb(idx) + model.pos_emb(torch.arange(10))
    h = model.layers[0].norm1(x)
    q, k, _ = attn.qkv(h).split(16, dim=-1)
    q = q.view(3, 10, 2, 8).transpose(1, 2)
    k = k.view(3, 10, 2, 8).transpose(1, 2)
    ref = torch.empty(3, 2, 10, 10)
    for b in range(3):
        for hh in range(2):
            for t in range(10):
                s = torch.tensor([float(q[b, hh, t].detach() @ k[b, hh, j].detach()) / math.sqrt(8)
                                  if j <= t else -math.inf for j in range(10)])
                ref[b, hh, t] = torch.softmax(s, 0)
    torch.testing.assert_close(cap.weights[0], ref, atol=1e-5, rtol=1e-4)
    assert len(cap.weights) == 2 and cap.slots == []
    assert cap.values[0].shape == (3, 2, 10, 8) and cap.resid[1].shape == (3, 10, 16)


def test_logits_match_hf_llama_with_copied_weights(llama_twin) -> None:
    cfg = _cfg(positions="rope", norm="rmsnorm", mlp_kind="swiglu", d_ff=24)
    model = TinyGPT(cfg).eval()
    hf = llama_twin(model, max_positions=10, attn_implementation="eager")
    idx = torch.randint(0, 13, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["sigmoid", "relu", "elu1", "softmax1"])
def test_unnormalised_kinds(kind: str) -> None:
    q, k = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    mask = attention_mask(6)
    w = ATTENTION_FNS[kind](q, k, mask)
    assert not ATTENTION_FNS[kind].normalised
    assert (w[..., ~mask] == 0).all()
    z = q @ k.transpose(-1, -2) / math.sqrt(8)
    if kind == "sigmoid":  # Gu et al.: sigmoid(q.k / sqrt(d)) times the 0/1 mask, no normaliser
        torch.testing.assert_close(w, torch.sigmoid(z) * mask)
    if kind == "relu":  # Guo et al.: relu(q.k / sqrt(d)) / (t + 1)
        torch.testing.assert_close(w, torch.relu(z) * mask / torch.arange(1, 7)[:, None])
    if kind == "softmax1":  # rows plus the virtual zero-logit key sum to one
        virtual = 1 / (1 + (z.exp() * mask).sum(-1))
        torch.testing.assert_close(w.sum(-1) + virtual, torch.ones(2, 3, 6))
    wn, _ = row_normalised(w)
    nonzero = w.sum(-1) > 0  # a ReLU row can be all zero: the head does nothing, no sink needed
    torch.testing.assert_close(wn.sum(-1)[nonzero], torch.ones(2, 3, 6)[nonzero])


@pytest.mark.parametrize("kind", ["softmax", "sigmoid_norm", "elu1_norm"])
def test_normalised_kinds_rows_sum_to_one(kind: str) -> None:
    w = ATTENTION_FNS[kind](torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), attention_mask(5, window=2))
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 5))
    assert (w[..., ~attention_mask(5, window=2)] == 0).all()


@pytest.mark.parametrize("bias,shared,sink_token,attention", [
    ("k", False, False, "softmax"), ("kv", True, False, "softmax"), ("none", False, True, "softmax"),
    ("none", False, False, "softmax1")])
def test_sink_slot_takes_the_missing_mass(bias: str, shared: bool, sink_token: bool, attention: str) -> None:
    model = TinyGPT(_cfg(attn_bias=bias, attn_bias_shared=shared, sink_token=sink_token, attention=attention,
                         positions="rope")).eval()
    with capture_tinygpt(model) as cap:
        out = model(torch.randint(0, 13, (2, 10)))
    assert out.shape == (2, 10, 13)
    for w, slot in zip(cap.weights, cap.slots):
        assert w.shape == (2, 2, 10, 10) and slot.shape == (2, 2, 10)
        torch.testing.assert_close(w.sum(-1) + slot, torch.ones(2, 2, 10))


def test_value_bias_has_no_slot_and_alibi_runs() -> None:
    model = TinyGPT(_cfg(attn_bias="v", positions="alibi", norm_position="post", mlp=False)).eval()
    with capture_tinygpt(model) as cap:
        model(torch.randint(0, 13, (1, 10)))
    assert cap.slots == [] and cap.weights[0].shape == (1, 2, 10, 10)


def test_alpha_from_weights_equals_manual_loop() -> None:
    w = torch.rand(2, 3, 7, 7) * attention_mask(7, window=3)
    visible = attention_mask(7, window=3)
    alpha = column_alpha(w, visible)
    per_sample = column_alpha(w, visible, per_sample=True)
    for h in range(3):
        for k in range(7):
            ts = [t for t in range(7) if visible[t, k]]
            manual = sum(float(w[b, h, t, k]) for b in range(2) for t in ts) / (2 * len(ts))
            assert abs(float(alpha[h, k]) - manual) < 1e-6
            for b in range(2):
                manual_b = sum(float(w[b, h, t, k]) for t in ts) / len(ts)
                assert abs(float(per_sample[b, h, k]) - manual_b) < 1e-6


@pytest.mark.parametrize("kw,needle", [
    ({"attention": "softmx"}, "unknown attention kind 'softmx'"),
    ({"d_model": 30, "n_heads": 4}, "n_heads=4 does not divide model.d_model=30"),
    ({"positions": "xpos"}, "model.positions"),
])
def test_bad_model_config_one_line(kw: dict, needle: str) -> None:
    with pytest.raises(InputError) as e:
        _cfg(**kw)
    assert needle in str(e.value) and "\n" not in str(e.value)
