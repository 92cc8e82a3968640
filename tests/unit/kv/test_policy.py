"""KVPolicy: budgets that add up, the ranking, files that round-trip (ours and DuoAttention's / kvpress's readers)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sinkscope.errors import InputError
from sinkscope.kv import duo_format
from sinkscope.kv.policy import KVPolicy, n_full_for_budget, window_for_budget

CARD = {"name": "toy", "n_layers": 30, "n_kv_heads": 3}


def _scores(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.dirichlet([1, 1, 1], size=(30, 3)) * 3  # distant, sink, window summing to G = 3
    return m


@pytest.mark.parametrize("budget", [0.125, 0.25, 0.5])
def test_budget_fixes_the_bytes_within_five_percent(budget: float) -> None:
    p = KVPolicy.from_scores(_scores(), budget, 4, 60, 1024, model=CARD)
    assert abs(p.budget - budget) / budget < 0.05
    assert p.budget == p.bytes_fraction(1024)
    n = p.n_full
    assert p.bytes_fraction(1024) == pytest.approx((n * 1024 + (90 - n) * 64) / (90 * 1024))
    assert p.bytes_fraction(32) == 1.0  # shorter than sinks + window: nothing is dropped


def test_the_heads_with_the_most_distant_mass_keep_the_full_cache() -> None:
    s = _scores()
    p = KVPolicy.from_scores(s, 0.25, 4, 60, 1024, model=CARD)
    full = p.full_matrix()
    assert full.sum() == n_full_for_budget(0.25, 90, 4, 60, 1024)
    assert s[..., 0][full].min() > s[..., 0][~full].max()


def test_uniform_and_random_controls() -> None:
    u = KVPolicy.uniform(CARD, 4, window_for_budget(0.25, 4, 1024), 1024)
    assert u.n_full == 0 and u.budget == pytest.approx(0.25)
    r1, r2 = (KVPolicy.random(CARD, 0.25, 4, 60, 1024, seed=s) for s in (1, 2))
    assert r1.n_full == r2.n_full == n_full_for_budget(0.25, 90, 4, 60, 1024)
    assert r1.full_heads != r2.full_heads
    assert KVPolicy.random(CARD, 0.25, 4, 60, 1024, seed=1) == r1
    with pytest.raises(InputError, match="below the streaming floor"):
        KVPolicy.random(CARD, 0.05, 4, 60, 1024)


def test_save_load_round_trip_and_one_line_errors(tmp_path) -> None:
    p = KVPolicy.from_scores(_scores(), 0.25, 4, 60, 1024, model=CARD, measured_kl=0.01, calibration_sha256="ab")
    p.save(tmp_path / "p")
    assert KVPolicy.load(tmp_path / "p") == p
    assert KVPolicy.load(tmp_path / "p" / "policy.json") == p
    bad = tmp_path / "bad"
    bad.mkdir()
    cases = {"": "not found", "{": "not valid JSON", '{"format": "other"}': "not a sinkscope KV policy"}
    d = json.loads((tmp_path / "p" / "policy.json").read_text())
    del d["window"]
    cases[json.dumps(d)] = "garbled"
    for text, message in cases.items():
        if text:
            (bad / "policy.json").write_text(text)
        with pytest.raises(InputError, match=message) as e:
            KVPolicy.load(bad)
        assert "\n" not in str(e.value)


def _duo_sparsify(gates: np.ndarray, sparsity: float, seed: int) -> np.ndarray:
    """DuoAttention's `sparsify_attention_heads(gates, sparsity=s)` as documented: ~1e-6 noise breaks ties, the
    threshold is the s-quantile of the gates, a head is full where gate >= threshold."""
    noisy = gates + np.random.default_rng(seed).uniform(0, 1e-6, gates.shape)
    threshold = np.quantile(noisy, sparsity)
    if sparsity >= 1:
        threshold = 2
    if sparsity <= 0:
        threshold = -1
    return noisy >= threshold


@pytest.mark.parametrize("budget", [0.125, 0.25, 0.5])
def test_duoattention_pattern_round_trips_through_both_readers(tmp_path, budget: float) -> None:
    p = KVPolicy.from_scores(_scores(3), budget, 4, 60, 1024, model=CARD)
    p.save(tmp_path)
    gates, sink, recent = duo_format.read_gates(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (sink, recent) == (4, 60) and gates.shape == (30, 3)
    assert ((gates >= 0) & (gates <= 1)).all()
    full = p.full_matrix()
    np.testing.assert_array_equal(duo_format.full_heads_by_threshold(gates, config["threshold"]), full)
    for seed in range(3):
        np.testing.assert_array_equal(_duo_sparsify(gates, config["sparsity"], seed), full)
    np.testing.assert_array_equal(duo_format.full_heads_by_compression(gates, config["head_compression_ratio"]), full)
    # the gates keep the ranking: the lowest-ranked full head still beats the best streaming head
    assert gates[full].min() > 0.5 > gates[~full].max()
    distant = _scores(3)[..., 0]
    for group in (full, ~full):
        np.testing.assert_array_equal(np.argsort(gates[group]), np.argsort(distant[group]))


def test_duo_reader_refuses_garbled_files(tmp_path) -> None:
    with pytest.raises(InputError, match="missing"):
        duo_format.read_gates(tmp_path)
    (tmp_path / "full_attention_heads.tsv").write_text("0.1\tx\n")
    (tmp_path / "config.json").write_text('{"sink_size": 4, "recent_size": 60}')
    with pytest.raises(InputError, match="not a tab-separated table"):
        duo_format.read_gates(tmp_path)
    (tmp_path / "full_attention_heads.tsv").write_text("0.1\t0.9\n")
    (tmp_path / "config.json").write_text('{"sink_size": 4}')
    with pytest.raises(InputError, match="sink_size and recent_size"):
        duo_format.read_gates(tmp_path)


def test_a_duoattention_pattern_loads_as_a_policy(tmp_path) -> None:
    p = KVPolicy.from_scores(_scores(5), 0.25, 4, 60, 1024, model=CARD)
    p.save(tmp_path)
    back = KVPolicy.from_duo(tmp_path, 1024)
    assert back.full_heads == p.full_heads and (back.n_sink, back.window) == (4, 60) and back.kind == "duo"
    # a hand-written learned pattern: gates 0.9 / 0.2 / 0.6 in one layer, 2 sinks + 8 recent
    d = tmp_path / "learned"
    d.mkdir()
    (d / "full_attention_heads.tsv").write_text("0.9\t0.2\t0.6\n0.1\t0.3\t1.2\n")
    (d / "config.json").write_text('{"sink_size": 2, "recent_size": 8}')
    assert KVPolicy.from_duo(d, 64).full_heads == ((0, 2), (2,))
    assert KVPolicy.from_duo(d, 64, threshold=0.95).full_heads == ((), (2,))  # 1.2 is clipped to 1
    assert KVPolicy.from_duo(d, 64, sparsity=0.5).n_full == 3
