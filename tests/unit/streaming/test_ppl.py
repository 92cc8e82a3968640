"""Streaming perplexity: batched recompute = one forward per token; policy bookkeeping; summary and CSV shape."""

from __future__ import annotations

import math

import pytest
import torch

from sinkscope.errors import InputError
from sinkscope.models.random_hf import tiny_model
from sinkscope.streaming.cache import sink_cache
from sinkscope.streaming.ppl import evaluate_stream, recompute_nll, stream_nll
from sinkscope.viz.streaming import log_ppl_figure


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", attn_implementation="eager")


def test_batched_recompute_equals_one_forward_per_token(model) -> None:
    torch.manual_seed(1)
    ids = torch.randint(3, 99, (50,))
    C = 9
    naive = []
    with torch.no_grad():
        for t in range(49):  # predict t+1 from the last C+1 tokens, fresh forward each time
            ctx = ids[max(0, t - C):t + 1]
            logits = model(ctx[None]).logits[0, -1]
            naive.append(torch.nn.functional.cross_entropy(logits[None], ids[t + 1:t + 2]).item())
    for bs in (1, 7):
        r = recompute_nll(model, ids, C, batch_size=bs)
        assert r.positions.tolist() == list(range(1, 50))
        torch.testing.assert_close(r.nll, torch.tensor(naive), atol=1e-5, rtol=0)
    part = recompute_nll(model, ids, C, positions=[3, 20, 49])
    torch.testing.assert_close(part.nll, torch.tensor(naive)[[2, 19, 48]], atol=1e-5, rtol=0)


def test_window_cache_matches_recompute_before_eviction(model) -> None:
    ids = torch.randint(3, 99, (30,))
    cached = stream_nll(model, ids, sink_cache(model, 0, 12))
    ref = recompute_nll(model, ids, 12)
    torch.testing.assert_close(cached.nll[:12], ref.nll[:12], atol=1e-5, rtol=0)  # same full prefix
    assert math.isclose(cached.ppl, math.exp(cached.nll.double().mean().item()))


def test_dense_stops_at_the_model_context() -> None:
    m = tiny_model("llama", max_position_embeddings=40)
    ids = torch.randint(3, 99, (60,))
    res = evaluate_stream(m, ids, n_sink=2, window=10, policies=["dense", "sinks"])
    assert len(res.policies["dense"].nll) == 39 and "context" in res.policies["dense"].note
    assert len(res.policies["sinks"].nll) == 59


def test_summary_rows_and_plot(model) -> None:
    ids = torch.randint(3, 99, (40,))
    res = evaluate_stream(model, ids, n_sink=2, window=8,
                          policies=["dense", "window", "sinks", "sinks_plain", "recompute"], batch_size=5,
                          mode="token")
    js = res.to_json()
    assert set(js["policies"]) == {"dense", "window", "sinks", "sinks_plain", "recompute"}
    for p in js["policies"].values():
        assert {"ppl", "peak_mem_mb", "tokens_per_s", "ppl_after_eviction"} <= set(p)
        assert p["ppl"] > 1 and p["tokens_per_s"] > 0
    # bounded policies hold the same KV budget; dense holds the whole stream
    assert js["policies"]["sinks"]["peak_mem_mb"] == js["policies"]["window"]["peak_mem_mb"]
    assert js["policies"]["dense"]["peak_mem_mb"] == pytest.approx(js["policies"]["sinks"]["peak_mem_mb"] * 39 / 11)
    rows = res.to_rows()
    assert len(rows) == 5 * 39 and set(rows[0]) == {"policy", "position", "nll"}
    fig = log_ppl_figure(res, smooth=8)
    assert len(fig.axes[0].lines) == 5 + 1  # one line per policy + the eviction marker


def test_bad_input(model) -> None:
    ids = torch.randint(3, 99, (20,))
    with pytest.raises(InputError, match="unknown policies"):
        evaluate_stream(model, ids, policies=["sink"])
    with pytest.raises(InputError):
        evaluate_stream(model, ids[:1])
    with pytest.raises(InputError):
        evaluate_stream(model, ids, window=0)


def test_modes_give_the_same_perplexities(model) -> None:
    """Default: fixed-mask policies in exact blocks, sinks token by token, recompute batched; --token-by-token
    gives the same numbers (1e-4 nats per token)."""
    ids = torch.randint(3, 99, (70,), generator=torch.Generator().manual_seed(2))
    names = ["dense", "window", "sinks", "sinks_plain", "recompute"]
    auto = evaluate_stream(model, ids, n_sink=2, window=8, policies=names, chunk=16)
    token = evaluate_stream(model, ids, n_sink=2, window=8, policies=names, mode="token")
    assert {k: v.mode for k, v in auto.policies.items()} == {
        "dense": "fast", "window": "fast", "sinks": "token", "sinks_plain": "fast", "recompute": "batched windows"}
    assert {v.mode for k, v in token.policies.items() if k != "recompute"} == {"token"}
    for name in names:
        assert (auto.policies[name].nll - token.policies[name].nll).abs().max().item() < 1e-4, name
    assert auto.to_json()["policies"]["window"]["mode"] == "fast"


def test_window_past_the_context_is_refused() -> None:
    m = tiny_model("llama", max_position_embeddings=40)
    with pytest.raises(InputError, match="exceed the model's context"):
        evaluate_stream(m, torch.randint(3, 99, (60,)), n_sink=4, window=40, policies=["sinks"])
    res = evaluate_stream(m, torch.randint(3, 99, (60,)), n_sink=4, window=40, policies=["dense"])  # dense: no window
    assert len(res.policies["dense"].nll) == 39
