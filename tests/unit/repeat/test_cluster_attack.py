"""Cluster attack mechanics on a tiny Llama: closed-form layer-0 representations, k-means, the three conditions."""

from __future__ import annotations

import torch

from sinkscope.interventions.cluster_attack import cluster_attack, cosine_kmeans, layer0_representations
from sinkscope.interventions.patch import NeuronRule, SinkPatch


@torch.no_grad()
def test_layer0_closed_form_matches_attention_output(tiny_llama):
    from sinkscope.capture import forward_hooks
    from sinkscope.repetition.activations import output_projection
    from sinkscope.models.adapters import get_adapter

    got = {}
    o = output_projection(get_adapter(tiny_llama), 0)
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
