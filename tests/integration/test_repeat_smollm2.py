"""The repeated-token phenomenon on the real SmolLM2, on words and documents the test does not pick by outcome:
long instructed runs diverge, the default patch (repeated keys counted once, by queries inside a repetition only)
stops it, and it leaves WikiText and the text after natural repetitions (where its gate does open) nearly alone,
unlike the earlier de-duplication; Yona et al.'s sink-layer rule finds a layer and its sink neurons.

Words: the first six development words outside the old patch-building words (`heldout_words()[:6]`: a fixed slice
of `DEV_WORDS`, not chosen by outcome). Documents: the three dev harm documents with the longest single-token runs
(the ones that open the gate most). Answers are 32 tokens (CI budget; the protocol's 128 are in docs/repetition.md).
"""

from __future__ import annotations

import pytest

from sinkscope.repetition.corpus import heldout_sequences, read_corpus
from sinkscope.repetition.grid import NO_PATCH, GridPlan, run_grid
from sinkscope.repetition.harm import load_harm_set, summarise_harm
from sinkscope.repetition.patch_methods import DEDUP_KEEP, DEDUP_QUERIES, dedup_patch
from sinkscope.repetition.side_effects import text_effect
from sinkscope.repetition.words import DEV_WORDS, heldout_words


def _default_patch():
    import dataclasses

    return dataclasses.replace(dedup_patch(base_model="smollm2-135m"), dedup_keep=DEDUP_KEEP,
                               dedup_queries=DEDUP_QUERIES)


@pytest.mark.slow
def test_default_patch_stops_divergence_on_unchosen_words(smollm2, tmp_path):
    model, tok = smollm2
    words = heldout_words(tok)[:6]
    assert set(words) <= set(DEV_WORDS)
    plan = GridPlan(words, ["instruct"], [1024], [NO_PATCH, "dedup"], max_new_tokens=32, batch_size=6)
    cells = run_grid(model, tok, plan, {NO_PATCH: None, "dedup": _default_patch()}, tmp_path).cells
    before = [c for c in cells if c["variant"] == NO_PATCH]
    after = [c for c in cells if c["variant"] == "dedup"]
    n_before, n_after = sum(r["diverged"] for r in before), sum(r["diverged"] for r in after)
    assert n_before >= 2, before
    assert n_after <= n_before // 5, after  # >= 80% relative reduction


@pytest.mark.slow
def test_default_patch_leaves_natural_repetition_and_wikitext_alone(smollm2):
    import dataclasses

    from sinkscope.corpora import corpus_path
    from sinkscope.repetition.harm import harm_effects

    model, tok = smollm2
    patch = _default_patch()
    old = dataclasses.replace(patch, dedup_queries="all")  # the earlier de-duplication: every later query
    docs = [d for d in load_harm_set("dev") if d.name in ("count-dog", "song-harbour", "laugh-chat-ha")]
    effects = harm_effects(model, tok, {"new": patch, "old": old}, docs)
    assert all(e.gate_opened > 0 for e in effects["new"])  # the harm test runs where the gate opens
    rows = {k: next(r for r in summarise_harm(v) if r["family"] == "all") for k, v in effects.items()}
    # text after a natural repetition is left nearly alone now; the old de-duplication changed it a lot
    assert rows["new"]["kl_after"] < 0.03 and rows["new"]["kl_after"] < rows["old"]["kl_after"] / 3, rows
    assert abs(rows["new"]["ppl_change"]) < 0.01
    text = text_effect(model, patch, heldout_sequences(tok, read_corpus(corpus_path()), n_text=4, n_chat=2))
    assert text.kl < 0.01 and abs(text.ppl_change) < 0.01


@pytest.mark.slow
def test_paper_sink_layer_rule_finds_a_layer(smollm2):
    from sinkscope.repetition.sink_neurons_paper import find_sink_layer, find_sink_neurons, probe_tokens

    model, tok = smollm2
    tokens = probe_tokens(tok, heldout_words(tok)[:16])
    sl = find_sink_layer(model, tokens)
    assert sl.layer is not None and sl.layer < sl.half and sl.mlp_norm[sl.layer] > sl.threshold
    neurons = find_sink_neurons(model, sl.layer, tokens, k=4)
    # a few neurons fire enormously at a lone token (hundreds of times the 4th), and zeroing the top one at token 0
    # removes most of the first token's residual-norm peak
    assert neurons[0].first_activation > 100 * neurons[-1].first_activation
    assert neurons[0].peak_drop > 0.5
