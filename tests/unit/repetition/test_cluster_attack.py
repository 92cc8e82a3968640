"""Cluster attack mechanics on a tiny Llama: closed-form layer-0 representations, k-means, the three conditions."""

from __future__ import annotations

import torch

from sinkscope.interventions.patch import NeuronRule, SinkPatch
from sinkscope.repetition.cluster_attack import (
    ClusterAttackOptions,
    cluster_attack,
    cosine_kmeans,
    layer0_representations,
)


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


def test_kmeans_separates_two_clouds():
    x = torch.cat([torch.randn(20, 4) + 5 * torch.eye(4)[0], torch.randn(20, 4) - 5 * torch.eye(4)[0]])
    labels, cent = cosine_kmeans(x, 2)
    assert len(set(labels[:20].tolist())) == 1 and len(set(labels[20:].tolist())) == 1 and labels[0] != labels[-1]


#: the planted cluster: 12 tokens of the tiny vocabulary (ids past the word list) that share one embedding
#: direction, which one layer-0 MLP neuron reads
PLANTED = list(range(60, 72))
NEURON = 5


@torch.no_grad()
def _plant_circuit(model) -> float:
    """Give the `PLANTED` tokens one embedding direction ``v`` and make layer 0's neuron `NEURON` read ``v``
    (gate and up rows along ``v``): the neuron fires on those tokens and stays small on the others. Returns the
    neuron's largest |activation| on sequences of other tokens (its ordinary range)."""
    from sinkscope.capture import forward_hooks
    from sinkscope.models.adapters import get_adapter

    g = torch.Generator().manual_seed(3)
    emb = model.get_input_embeddings().weight
    d = emb.shape[1]
    v = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    emb[PLANTED] = 2.0 * v + 0.01 * torch.randn(len(PLANTED), d, generator=g)
    mlp = model.model.layers[0].mlp
    mlp.gate_proj.weight[NEURON] = 4.0 * v
    mlp.up_proj.weight[NEURON] = 4.0 * v
    got = []
    down = get_adapter(model).mlp_down_module(0)
    other = [t for t in range(4, 99) if t not in PLANTED]
    ids = torch.tensor([other[i:i + 16] for i in range(0, 80, 16)])
    with forward_hooks([(down, lambda x: got.append(x[..., NEURON].abs().max()), True)]):
        model(input_ids=ids)
    return float(got[0])


def test_attack_finds_the_cluster_that_fires_the_circuit(tiny_llama, tiny_tok):
    """A tiny model built to have a circuit (one neuron reading one token cluster's direction): the search must
    pick that cluster, and its sequences must fire the neuron far above the random sequences'."""
    ordinary = _plant_circuit(tiny_llama)
    patch = SinkPatch([NeuronRule(0, [NEURON], [ordinary], [0.0])], "tiny")
    res = cluster_attack(tiny_llama, tiny_tok, patch, ["cat", "dog"], [12],
                         ClusterAttackOptions(k=6, probe_length=16, tail=3, max_new_tokens=3))
    allowed = torch.tensor([t for t in range(len(tiny_tok)) if t not in tiny_tok.all_special_ids])
    labels, _ = cosine_kmeans(layer0_representations(tiny_llama, allowed), 6, seed=0)  # the attack's clustering
    planted = {int(labels[allowed.tolist().index(t)]) for t in PLANTED}
    assert planted == {res.best_cluster}, res.clusters[0]  # every planted token in the best cluster
    assert res.clusters[0]["score"] > 3 * res.clusters[1]["score"]
    fire = {r["kind"]: r["sink_fire"] for r in res.rates}
    assert fire["cluster"] > 3 * max(fire["random"], fire["repeat"]), fire
    assert {r["words"] for r in res.rates} == {2} and len(res.rows) == 3 * 2


def test_attack_refuses_what_it_cannot_score(tiny_llama, tiny_tok):
    import pytest

    from sinkscope.errors import InputError

    rule = SinkPatch([NeuronRule(0, [NEURON], [1.0], [0.0])], "tiny")
    with pytest.raises(InputError, match="threshold 0"):  # the paper's patch: no ordinary range to score against
        cluster_attack(tiny_llama, tiny_tok, SinkPatch([NeuronRule(0, [1], [0.0], [0.0])], "tiny"), ["cat"], [4])
    with pytest.raises(InputError, match="probe-clusters"):
        ClusterAttackOptions(probe_clusters=0)
    with pytest.raises(InputError, match="more clusters than"):
        cluster_attack(tiny_llama, tiny_tok, rule, ["cat"], [4], ClusterAttackOptions(k=100000))
    with pytest.raises(InputError, match="no cluster has"):
        cluster_attack(tiny_llama, tiny_tok, rule, ["cat"], [4], ClusterAttackOptions(k=90))


@torch.no_grad()
def test_fire_score_of_a_direction_rule_is_the_projection_in_ordinary_units(tiny_llama):
    from sinkscope.interventions.patch import DirectionRule
    from sinkscope.repetition.cluster_attack import _fire_score

    d = tiny_llama.config.hidden_size
    u = torch.nn.functional.normalize(torch.randn(d), dim=0)
    patch = SinkPatch([], "tiny", directions=[DirectionRule(0, u.tolist(), 0.5, 0.1)])
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    score = _fire_score(tiny_llama, prompts, [1, 2], patch)
    for b, (p, s) in enumerate(zip(prompts, [1, 2])):
        x = tiny_llama(input_ids=torch.tensor([p]), output_hidden_states=True).hidden_states[1][0]  # after layer 0
        ref = ((x[s:] @ u - 0.1) / 0.4).clamp(-10, 10).mean()
        assert abs(float(score[b]) - float(ref)) < 1e-4


def test_attack_resumes_with_the_same_prompts_and_refuses_other_settings(tiny_llama, tiny_tok, tmp_path, monkeypatch):
    """Answers go to cells.jsonl batch by batch; a re-run generates only what is missing (a torn last line
    included) and draws the same sequences (each cell's generator is seeded by its coordinates alone)."""
    import pytest

    import sinkscope.repetition.cluster_attack as ca
    from sinkscope.errors import InputError

    ordinary = _plant_circuit(tiny_llama)
    patch = SinkPatch([NeuronRule(0, [NEURON], [ordinary], [0.0])], "tiny")
    opts = ClusterAttackOptions(k=6, probe_length=16, tail=3, max_new_tokens=3, batch_size=2)
    seen: list[list[int]] = []
    real = ca.greedy_continue
    monkeypatch.setattr(ca, "greedy_continue", lambda m, prompts, **kw: seen.extend(prompts) or real(m, prompts, **kw))
    out = tmp_path / "cl"
    first = cluster_attack(tiny_llama, tiny_tok, patch, ["cat", "dog", "tree"], [6], opts, out_dir=out)
    all_prompts = list(seen)
    assert len(all_prompts) == 9 and len((out / "cells.jsonl").read_text().splitlines()) == 9
    lines = (out / "cells.jsonl").read_text().splitlines()
    (out / "cells.jsonl").write_text("\n".join(lines[:7]) + "\n" + lines[7][:15])  # 7 whole, one torn, one gone
    seen.clear()
    again = cluster_attack(tiny_llama, tiny_tok, patch, ["cat", "dog", "tree"], [6], opts, out_dir=out)
    assert len(seen) == 2 and all(p in all_prompts for p in seen)  # the same two prompts, drawn again
    assert again.rows == first.rows and again.rates == first.rates
    with pytest.raises(InputError, match="other settings"):
        cluster_attack(tiny_llama, tiny_tok, patch, ["cat"], [6], ClusterAttackOptions(k=6, probe_length=16, tail=3,
                                                                                      max_new_tokens=4), out_dir=out)


@torch.no_grad()
def test_defence_answers_under_the_patch_and_leaves_the_model_clean(tiny_llama, tiny_tok):
    """With a defence, every prompt is answered twice; the defence's hooks act during its answers (a clamp of
    every MLP neuron of layer 0 changes the circuit's firing) and are gone afterwards (logits as before)."""
    from sinkscope.interventions.patch import NeuronRule as NR

    ordinary = _plant_circuit(tiny_llama)
    patch = SinkPatch([NeuronRule(0, [NEURON], [ordinary], [0.0])], "tiny")
    inter = tiny_llama.config.intermediate_size
    clamp = SinkPatch([NR(0, list(range(inter)), [1e-6] * inter, [0.0] * inter)], "tiny", protect_first=False)
    ids = torch.tensor([[5, 6, 7, 60, 61, 62]])
    before = tiny_llama(input_ids=ids).logits
    res = cluster_attack(tiny_llama, tiny_tok, patch, ["cat", "dog"], [12],
                         ClusterAttackOptions(k=6, probe_length=16, tail=3, max_new_tokens=3), defence=("clamp", clamp))
    torch.testing.assert_close(tiny_llama(input_ids=ids).logits, before, rtol=0, atol=0)
    assert {(r["kind"], r["variant"]) for r in res.rates} == {(k, v) for k in ("cluster", "repeat", "random")
                                                              for v in ("none", "clamp")}
    fire = {(r["kind"], r["variant"]): r["sink_fire"] for r in res.rates}
    assert fire[("cluster", "none")] > 1.0 and fire[("cluster", "clamp")] < 0.01 * fire[("cluster", "none")], fire
    for r in res.rates:  # the interval brackets the rate and has the Wilson width for its counts
        from sinkscope.metrics.rates import wilson_interval

        assert (r["ci_low"], r["ci_high"]) == wilson_interval(r["diverged"], r["words"])
        assert r["ci_low"] <= r["rate"] <= r["ci_high"] and r["ci_high"] - r["ci_low"] > 0.3  # n = 2: wide
