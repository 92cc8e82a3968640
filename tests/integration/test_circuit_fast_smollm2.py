"""The fast circuit search on the real SmolLM2: batched, truncated ablations equal one full forward per component,
and the linearity check catches the layer-0 head whose effect a gradient does not see (docs/repetition.md)."""

from __future__ import annotations

import pytest
import torch

from sinkscope.interventions.ablate import Component
from sinkscope.repetition import sink_effects as se
from sinkscope.repetition.corpus import read_corpus, text_chunks


@pytest.mark.slow
def test_fast_ablations_equal_the_reference_and_catch_the_threshold_head(smollm2):
    model, tok = smollm2
    ids = torch.tensor(text_chunks(tok, read_corpus(None), n=8, length=32, offset=10))  # the command's text
    some = [Component(0, "head", 0), Component(11, "neuron", 1229), Component(20, "head", 3)]
    with se.eager_attention(model):
        ref = se.reference_effects(model, ids, some)
        fast = se.ablation_effects(model, se.sink_baseline(model, ids), some)
    for c in some:
        assert fast[c] == pytest.approx(ref[c], rel=1e-5, abs=1e-6), c.name
    # layer-0 heads: zeroing L0.H0 at token 0 removes a large share of the attention on token 0, which its
    # gradient does not predict; the joint ablation of layer 0's heads shows the group is nonlinear
    cands = [Component(l, "head", h) for l in (0, 20) for h in range(9)]
    found = se.search_effects(model, ids, cands, exact=2)
    head0 = Component(0, "head", 0)
    assert head0 in found.exact and found.exact[head0] == pytest.approx(ref[head0], rel=1e-5, abs=1e-6)
    assert [g["linear"] for g in found.groups] == [False, True]
    assert found.shares(found.exact[head0])[1] > 0.05 > found.shares(found.estimates[head0])[1]
