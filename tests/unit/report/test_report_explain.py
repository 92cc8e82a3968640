"""The "what this means" paragraphs follow the numbers: different numbers, different statements."""

from __future__ import annotations

from sinkscope.report import explain


def _kinds(**sink0):
    return {"eps": 0.3, "kinds": {
        k: {"sink0": v, "top_sinks": [{"position": 0, "sink_ratio": v}, {"position": 5, "sink_ratio": 0.02}],
            "top_other": {"position": 5, "sink_ratio": 0.02}, "formation_layer": 3 if v > 0.5 else None,
            "sink_ratio_first_by_layer": [0.0, 0.1, 0.3, 0.9, 0.2, 0.8], "layers": list(range(6))}
        for k, v in sink0.items()}}


def test_sinks_same_vs_vanishing_vs_different() -> None:
    same = " ".join(explain.explain_sinks(_kinds(text=0.7, random=0.75)))
    assert "70% of all heads on text and 75% on random" in same and "barely changes" in same
    gone = " ".join(explain.explain_sinks(_kinds(text=0.7, repeat=0.0)))
    assert "On repeat the first-token sink disappears" in gone and "barely" not in gone
    diff = " ".join(explain.explain_sinks(_kinds(text=0.7, code=0.4)))
    assert "strongest on text and weakest on code" in diff
    assert "from layer 3 on text" in same and "in layer(s) 4" in same  # formation layer and the gap after it
    assert "No other position comes close" in same


def test_secondary_sink_is_named() -> None:
    s = _kinds(text=0.7)
    s["kinds"]["text"]["top_other"] = {"position": 1, "sink_ratio": 0.3}
    assert "position 1 on text (30% of heads)" in " ".join(explain.explain_sinks(s))


def test_drains_follow_the_ratios() -> None:
    base = {"residual_peak": {"layer": 11, "ratio": 165.0}, "peak_from_layer": 11, "value_ratio_median": 0.23,
            "drain_layers": 25, "n_layers": 30, "massive_dims": [{"dim": 507, "max_value": 25144.0, "layers": 28}],
            "massive_median": 1.6, "input": "text",
            "by_kind": {"text": {"layer": 11, "first_norm": 2e4, "median_other_norm": 130.0, "residual_peak": 165.0},
                        "repeat": {"layer": 11, "first_norm": 2e4, "median_other_norm": 2e4, "residual_peak": 1.0}}}
    strong = " ".join(explain.explain_drains(base))
    assert "165 times longer" in strong and "from layer 11" in strong and "25 of 30 layers" in strong
    assert "dimension 507" in strong and "On repeat inputs the ordinary tokens carry the peak too" in strong
    weak = " ".join(explain.explain_drains({**base, "residual_peak": {"layer": 2, "ratio": 1.4},
                                            "value_ratio_median": 0.9, "massive_dims": [], "by_kind": {}}))
    assert "No strong residual-state peak" in weak and "No clear value-state drain" in weak
    assert "No massive activations" in weak


def test_dormant_names_the_top_head_only_when_it_switches() -> None:
    top = {"layer": 14, "head": 1, "dependence": 0.52, "most_dormant_on": "code", "most_active_on": "random",
           "alpha0_code": 0.84, "alpha0_random": 0.32, "alpha0_text": 0.75, "out_norm_ratio": 2.6}
    s = {"threshold": 0.5, "n_heads": 270, "n_dormant": 74, "n_active": 75, "n_switching": 121,
         "dormant_share": {"text": 0.39, "code": 0.63, "random": 0.45}, "top": [top]}
    text = " ".join(explain.explain_dormant(s))
    assert "74 of 270" in text and "121 switch" in text and "layer 14 head 1" in text and "sleep on code" in text
    flat = " ".join(explain.explain_dormant({**s, "top": [{**top, "dependence": 0.1}]}))
    assert "layer 14 head 1" not in flat and "No head changes its behaviour strongly" in flat


def test_model_card_bos() -> None:
    card = {"model_type": "llama", "n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "bos_added": False}
    assert "adds no BOS" in " ".join(explain.explain_model(card))
    assert "3 query heads share" in " ".join(explain.explain_model(card))
    assert "puts a BOS" in " ".join(explain.explain_model({**card, "bos_added": True}))


def test_repetition_follows_rates_and_patch() -> None:
    none = " ".join(explain.explain_repetition({"rates": {"32": 0.0, "256": 0.0}}))
    assert "No continuation diverged for runs of 32 to 256 copies" in none
    s = {"rates": {32: 0.0, 256: 0.17, 512: 0.5},
         "circuit": {"description": "neuron 7 of layer 3 removes 40% of the sink."},
         "patch": {"method": "dedup", "n": 512, "words": ["poem", "book", "cat"], "still_diverged": 1,
                   "description": "attention de-duplication inside repetitions"}}
    text = " ".join(explain.explain_repetition(s))
    assert "starts at 256 copies and reaches 50% of the words at 512" in text
    assert "neuron 7 of layer 3" in text and "reduces the divergence at 512 copies" in text
    assert "The shipped default patch (`dedup`: attention de-duplication inside repetitions)" in text
    assert "of the 3 word(s) that diverged without it (poem, book, cat), 1 still diverge" in text
    stops = " ".join(explain.explain_repetition({**s, "patch": {**s["patch"], "still_diverged": 0}}))
    assert "stops the divergence" in stops
    same = " ".join(explain.explain_repetition({**s, "patch": {**s["patch"], "still_diverged": 3}}))
    assert "does not stop the divergence" in same
    nothing = " ".join(explain.explain_repetition({"rates": {512: 0.0}, "patch_note": "no word diverged at 512"}))
    assert "Patch: no word diverged at 512." in nothing


def _harm(kl_all: float, opens: int = 2) -> dict:
    row = {"kl_inside": 0.004, "kl_after": 0.002, "kl_all": kl_all, "ppl_change": 0.002}
    return {"method": "dedup", "set": "eval", "documents": 35, "gate_opens": ["a", "b"][:opens],
            "measured": ["a", "b"][:opens],
            "rows": [{**row, "family": "song"}, {**row, "family": "count", "kl_all": 2 * kl_all},
                     {**row, "family": "all"}] if opens else []}


def test_repetition_harm_names_where_it_was_measured() -> None:
    low = " ".join(explain.explain_repetition({"rates": {}, "harm": _harm(0.003)}))
    assert ("Harm of the `dedup` patch, measured where it acts: its repetition gate opens on 2 of the 35 shipped "
            "EVAL natural-repetition documents") in low
    assert "overall (largest family: count, 0.006); perplexity changes by +0.20%" in low
    assert "barely changes ordinary text that repeats" in low
    high = " ".join(explain.explain_repetition({"rates": {}, "harm": _harm(0.02)}))
    assert "changes the predictions on text that repeats" in high and "barely" not in high
    closed = " ".join(explain.explain_repetition({"rates": {}, "harm": _harm(0.0, opens=0)}))
    assert "opens on 0 of the 35" in closed and "KL 0 by construction" in closed
