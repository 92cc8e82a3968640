"""Cluster attack mechanics on a tiny Llama: closed-form layer-0 representations, k-means, the three conditions."""

from __future__ import annotations

import torch

from sinkscope.interventions.cluster_attack import cluster_attack, cosine_kmeans, layer0_representations
from sinkscope.interventions.patch import NeuronRule, SinkPatch


@torch.no_grad()
def test_layer0_closed_form_matches_attention_output(tiny_llama):
    from sinkscope.capture import forward_hooks
    from sinkscope.models.adapters import get_adapter

    got = {}
    o = get_adapter(tiny_llama).output_projection(0)
    with forward_hooks([(o, lambda x: got.__setitem__("out", x), False)]):
        tiny_llama(input_ids=torch.tensor([[7]]))
    rep = layer0_representations(tiny_llama, torch.tensor([7]))
    torch.testing.assert_close(rep[0], got["out"][0, 0], atol=1e-5, rtol=1e-4)


def test_kmeans_and_attack(tiny_llama, tiny_tok):
    x = torch.cat([torch.randn(20, 4) + 5 * torch.eye(4)[0], torch.randn(20, 4) - 5 * torch.eye(4)[0]])
    labels, cent = cosine_kmeans(x, 2)
    assert len(set(labels[:20].tolist())) == 1 and labels[0] != labels[-1]
    patch = SinkPatch([NeuronRule(0, [1, 2], [0.01, 0.01], [0.0, 0.0])], "tiny")
    res = cluster_attack(tiny_llama, tiny_tok, patch, ["cat", "dog"], [6], k=4, probe_length=8, tail=3,
                         max_new_tokens=3)
    assert {r["kind"] for r in res.rates} == {"cluster", "repeat", "random"}
    assert all(0.0 <= r["rate"] <= 1.0 and r["words"] == 2 for r in res.rates)
    scores = [c["score"] for c in res.clusters]
    assert scores == sorted(scores, reverse=True) and res.best_cluster == res.clusters[0]["cluster"]


@torch.no_grad()
def test_fire_score_of_a_direction_rule_is_the_projection_in_ordinary_units(tiny_llama):
    from sinkscope.interventions.cluster_attack import _fire_score
    from sinkscope.interventions.patch import DirectionRule

    d = tiny_llama.config.hidden_size
    u = torch.nn.functional.normalize(torch.randn(d), dim=0)
    patch = SinkPatch([], "tiny", directions=[DirectionRule(0, u.tolist(), 0.5, 0.1)])
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    score = _fire_score(tiny_llama, prompts, [1, 2], patch)
    for b, (p, s) in enumerate(zip(prompts, [1, 2])):
        x = tiny_llama(input_ids=torch.tensor([p]), output_hidden_states=True).hidden_states[1][0]  # after layer 0
        ref = ((x[s:] @ u - 0.1) / 0.4).clamp(-10, 10).mean()
        assert abs(float(score[b]) - float(ref)) < 1e-4
