"""calibrate on a tiny model: the ranking, the budget, the measured KL equal to the cache's real effect, max_kl."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from sinkscope.compat import cache_kwargs
from sinkscope.errors import InputError
from sinkscope.kv.cache import headwise_cache
from sinkscope.kv.calibrate import calibrate
from sinkscope.kv.calibration_data import calibration_sets
from sinkscope.kv.mass import head_masses
from sinkscope.models.random_hf import TINY_WORDS, tiny_model, tiny_tokenizer

L, S, W = 48, 2, 5


@pytest.fixture(scope="module")
def setup():
    rng = random.Random(0)
    text = " ".join(rng.choice(TINY_WORDS) for _ in range(500))
    return tiny_model("llama"), tiny_tokenizer(), text


@torch.no_grad()
def _kl_through_the_cache(model, policy, pieces) -> float:
    """Mean KL(dense || cache) over positions t > S + W, the cache fed token by token."""
    total, n = 0.0, 0
    for ids in pieces:
        dense = torch.log_softmax(model(ids[None]).logits[0], -1)
        cache = headwise_cache(model, policy)
        got = torch.cat([model(ids[None, t:t + 1], **cache_kwargs(model, cache)).logits[0] for t in range(len(ids))])
        lp = torch.log_softmax(got, -1)
        d, p = dense[S + W + 1:], lp[S + W + 1:]
        total += float((d.exp() * (d - p)).sum())
        n += d.shape[0]
    return total / n


def test_budget_policy_ranks_by_distant_mass_and_its_kl_is_the_caches(setup) -> None:
    model, tok, text = setup
    res = calibrate(model, tok, texts=[text], target_length=L, n_sink=S, window=W, budget=0.6)
    p = res.policy
    sets = calibration_sets(tok, L, texts=[text])
    masses = head_masses(model, sets.ranking, n_sink=S, window=W)
    np.testing.assert_allclose(p.scores_array(), masses, atol=1e-9)
    full = p.full_matrix()
    assert full.sum() == 2 and masses[..., 0][full].min() >= masses[..., 0][~full].max()
    assert abs(p.budget - 0.6) / 0.6 < 0.1 and p.calibration_sha256 and len(p.calibration_sha256) == 64
    assert p.measured_kl == pytest.approx(_kl_through_the_cache(model, p, sets.held_out), rel=1e-3, abs=1e-7)
    assert p.measured_kl > 0


def test_max_kl_picks_the_smallest_budget_under_the_bound(setup) -> None:
    model, tok, text = setup
    loose = calibrate(model, tok, texts=[text], target_length=L, n_sink=S, window=W, max_kl=1.0)
    assert loose.policy.n_full == 0  # everything streaming already satisfies a loose bound
    some = calibrate(model, tok, texts=[text], target_length=L, n_sink=S, window=W, budget=0.3).policy.measured_kl
    bound = some * 0.999  # just below the 1-head policy's KL: needs more than that
    res = calibrate(model, tok, texts=[text], target_length=L, n_sink=S, window=W, max_kl=bound)
    p = res.policy
    assert p.measured_kl <= bound
    kl = {r["n_full"]: r["kl"] for r in res.curve}
    assert p.n_full - 1 in kl and kl[p.n_full - 1] > bound  # one head fewer breaks the bound


def test_bad_requests_fail_in_one_line_before_any_work(setup) -> None:
    model, tok, text = setup
    with pytest.raises(InputError, match="not both"):
        calibrate(model, tok, texts=[text], budget=0.5, max_kl=0.1)
    with pytest.raises(InputError, match="streaming floor"):
        calibrate(model, tok, texts=[text], target_length=L, n_sink=S, window=W, budget=0.05)
    with pytest.raises(InputError, match="at least"):
        calibrate(model, tok, texts=["the cat"], target_length=L, n_sink=S, window=W, budget=0.5)
