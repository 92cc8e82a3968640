"""The repeated-token phenomenon on the real SmolLM2: long instructed runs diverge, the circuit is found from
measurements, and the circuit-derived patch leaves ordinary text alone.

The patch's divergence cut (25% relative on held-out words, target 80%) is documented in docs/repetition.md as
not met; this test asserts only what holds, and fails if the patch ever makes divergence worse on these words.
"""

from __future__ import annotations

import pytest

from sinkscope.interventions.patch import apply_patch, build_patch
from sinkscope.repetition.activations import neuron_stats
from sinkscope.repetition.circuit import localise_sink_circuit
from sinkscope.repetition.corpus import calibration_sequences, heldout_sequences, read_corpus, text_chunks
from sinkscope.repetition.evaluate import divergence_verdicts, text_effect

#: words that diverge at N = 512 on SmolLM2-135M-Instruct in the instruction form (docs/repetition.md)
WORDS = ["book", "house", "tree", "fire", "window"]


@pytest.mark.slow
def test_long_runs_diverge_and_the_patch_spares_text(smollm2):
    model, tok = smollm2
    text = read_corpus(None)
    stats = neuron_stats(model, calibration_sequences(tok, text, n_text=12, n_chat=6))
    circuit = localise_sink_circuit(model, tok, text_chunks(tok, text, n=4, length=32), stats,
                                    run_words=["book", "money"], run_length=512, heads=False, per_layer=3,
                                    max_new_tokens=8)
    # the sink's biggest writers are found from measurements: ablating the top component removes a real share
    assert circuit.components[0].effect > 0.1
    patch = build_patch(circuit, stats, base_model="smollm2-135m")
    assert 0 < patch.n_neurons < 40
    before = divergence_verdicts(model, tok, WORDS, 512, max_new_tokens=12, batch_size=5)
    with apply_patch(model, patch):
        after = divergence_verdicts(model, tok, WORDS, 512, max_new_tokens=12, batch_size=5)
    n_before, n_after = sum(r["diverged"] for r in before), sum(r["diverged"] for r in after)
    assert n_before >= 3, before
    assert n_after <= n_before, after
    effect = text_effect(model, patch, heldout_sequences(tok, text, n_text=4, n_chat=2))
    assert effect.kl < 0.01 and abs(effect.ppl_change) < 0.01
