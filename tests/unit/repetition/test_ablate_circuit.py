"""Ablation hooks and circuit localisation on a tiny random Llama (mechanics only: no hard-coded indices)."""

from __future__ import annotations

import math

import pytest
import torch

from sinkscope.errors import InputError
from sinkscope.interventions.ablate import Component, ablate
from sinkscope.repetition.activations import neuron_stats
from sinkscope.repetition.circuit import SinkCircuit, localise_sink_circuit
from sinkscope.repetition.patch_methods import neuron_patch


@torch.no_grad()
def test_ablation_positions(tiny_llama):
    ids = torch.randint(4, 99, (2, 8))
    base = tiny_llama(input_ids=ids).logits
    for comp in (Component(1, "head", 2), Component(0, "neuron", 5)):
        with ablate(tiny_llama, [comp], positions="rest"):
            rest = tiny_llama(input_ids=ids).logits
        with ablate(tiny_llama, [comp], positions="first"):
            first = tiny_llama(input_ids=ids).logits
        torch.testing.assert_close(rest[:, 0], base[:, 0])  # causal: position 0 sees only itself
        assert (rest[:, 1:] - base[:, 1:]).abs().max() > 1e-6
        assert (first[:, 0] - base[:, 0]).abs().max() > 1e-6
    torch.testing.assert_close(tiny_llama(input_ids=ids).logits, base)
    with pytest.raises(InputError, match="heads"):
        with ablate(tiny_llama, [Component(0, "head", 99)]):
            pass
    with pytest.raises(InputError, match="kind"):
        Component(0, "layer", 1)


def test_localise_circuit_tiny(tiny_llama, tiny_tok):
    g = torch.Generator().manual_seed(1)
    text = torch.randint(4, 99, (4, 16), generator=g).tolist()
    stats = neuron_stats(tiny_llama, text)
    assert len(stats.first) == 2 and stats.first[0].shape == (64,)
    circ = localise_sink_circuit(tiny_llama, tiny_tok, text, stats, run_words=["cat", "dog"], run_length=12,
                                 ratio=0.0, floor=0.0, per_layer=3, max_new_tokens=4, last_positions=4)
    kinds = [c.kind for c in circ.components]
    assert kinds.count("head") == 2 * 4 and kinds.count("neuron") == 2 * 3
    effects = [c.effect for c in circ.components]
    assert effects == sorted(effects, reverse=True)
    _fire_matches_plain_forwards(tiny_llama, tiny_tok, circ, ["cat", "dog"], 12, last=4)
    assert len(circ.runs) == 2 and all("diverged" in r for r in circ.runs)
    again = SinkCircuit.from_json(circ.to_json())
    assert [(c.layer, c.kind, c.index) for c in again.components] == [(c.layer, c.kind, c.index)
                                                                      for c in circ.components]
    for c in circ.components:  # the ablation measured something real for at least one component
        assert not math.isnan(c.effect)
    assert max(abs(c.effect) for c in circ.components) > 1e-4
    patch = neuron_patch(circ, stats, base_model="tiny", fire_min=0.0)
    assert patch.n_neurons == 6
    with pytest.raises(InputError, match="fires"):
        neuron_patch(circ, stats, base_model="tiny", fire_min=2.0)



@torch.no_grad()
def _fire_matches_plain_forwards(model, tok, circ, words, n, *, last):
    """Each neuron's firing share on runs, read from the generation's batched prefill (`_fire_on_runs`), equals
    the share of the last ``last`` run positions above its range in a plain forward of each run prompt alone.
    The ranges are set to the median activation there, so that the shares are neither 0 nor 1."""
    from sinkscope.capture import forward_hooks
    from sinkscope.models.adapters import get_adapter
    from sinkscope.repetition.circuit import _fire_on_runs
    from sinkscope.repetition.prompts import build_prompt

    a = get_adapter(model)
    neurons = [c for c in circ.components if c.kind == "neuron"]
    acts = {}
    for c in neurons:
        got = []
        for w in words:
            with forward_hooks([(a.mlp_down_module(c.layer), lambda x: got.append(x[0, -last:, c.index].abs()), True)]):
                model(input_ids=torch.tensor([build_prompt(tok, w, n, "instruct").ids]))
        acts[id(c)] = got
        c.text_range = float(torch.cat(got).median())
    _fire_on_runs(model, tok, neurons, words, n, "instruct", 4, last, 8, lambda *_: None)
    for c in neurons:
        want = sum(float((g > c.text_range).float().mean()) for g in acts[id(c)]) / len(words)
        assert 0.0 < want < 1.0
        assert c.fire_run == pytest.approx(want, abs=1e-6), (c.layer, c.index)
