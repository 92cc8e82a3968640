"""The fast circuit search equals the original one: batched, truncated ablations give the effects of one full forward
per component; attribution pruning keeps the exhaustive top-k; run activations come from generation's prefill."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch

from sinkscope.errors import InputError
from sinkscope.interventions.ablate import Component, ablate, ablate_rows
from sinkscope.models.adapters import get_adapter
from sinkscope.models.random_hf import tiny_model
from sinkscope.repetition import sink_effects as se
from sinkscope.repetition.activations import neuron_stats, quantile_dim0
from sinkscope.repetition.circuit import _run_captures, localise_sink_circuit
from sinkscope.repetition.prompts import build_prompt


def _candidates(model: torch.nn.Module) -> list[Component]:
    a = get_adapter(model)
    cands = [Component(l, "head", h) for l in a.attention_layers for h in range(a.n_heads)]
    if a.mlp_down_module(0) is not None and a.model_type != "opt":  # OPT's MLP runs on (B*T, F): no neurons
        cands += [Component(l, "neuron", j) for l in range(a.n_layers) for j in (1, 7, 30)]
    return cands


def _means(model: torch.nn.Module, cands: list[Component]) -> dict[Component, object]:
    g = torch.Generator().manual_seed(3)
    d = get_adapter(model).d_head
    return {c: (float(torch.randn(1, generator=g)) if c.kind == "neuron" else torch.randn(d, generator=g))
            for c in cands}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gpt2", "opt", "qwen3_next"])
@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_batched_truncated_ablation_equals_one_at_a_time(arch, mode):
    model = tiny_model(arch)
    cands = _candidates(model)
    means = _means(model, cands) if mode == "mean" else None
    ids = torch.randint(4, 90, (3, 10))
    with se.eager_attention(model):
        ref = se.reference_effects(model, ids, cands, mode=mode, means=means)
        base = se.sink_baseline(model, ids)
        fast = se.ablation_effects(model, base, cands, mode=mode, means=means, max_rows=7)  # 2 variants/forward
        assert (base.residual, base.attention) == pytest.approx(se.sink_measure(model, ids), rel=1e-6)
    assert fast.keys() == ref.keys()
    for c in cands:
        assert fast[c] == pytest.approx(ref[c], rel=1e-5, abs=1e-6), c.name
    # the ablations did something (else equality would be empty)
    assert max(max(abs(ref[c][0] - base.residual), abs(ref[c][1] - base.attention)) for c in cands) > 1e-5


def test_cut_that_changes_the_model_falls_back_to_whole_forwards(monkeypatch):
    """A model whose forward indexes per-layer state the cut does not cover: the control variant catches it."""
    model = tiny_model("gemma2")  # alternating sliding / full layers, window shorter than the text
    cands = _candidates(model)
    ids = torch.randint(4, 90, (2, 12))
    original = se._from_layer
    starts: list[int] = []

    @contextlib.contextmanager
    def uncut_types(model, a, layer, hidden):
        types = model.config.layer_types
        with original(model, a, layer, hidden):
            model.config.layer_types = types  # the cut layers now read the wrong layer types
            yield
        starts.append(layer)

    monkeypatch.setattr(se, "_from_layer", uncut_types)
    with se.eager_attention(model):
        ref = se.reference_effects(model, ids, cands)
        fast = se.ablation_effects(model, se.sink_baseline(model, ids), cands)
    assert starts == [1]  # tried once, then whole forwards
    for c in cands:
        assert fast[c] == pytest.approx(ref[c], rel=1e-5, abs=1e-6), c.name


@torch.no_grad()
def test_ablate_rows_is_ablate_per_block(tiny_llama):
    ids = torch.randint(4, 99, (2, 8))
    groups = [[Component(1, "head", 2)], [], [Component(0, "neuron", 5), Component(1, "head", 0)]]
    with ablate_rows(tiny_llama, groups, rows=2, positions="rest"):
        batched = tiny_llama(input_ids=ids.repeat(3, 1)).logits
    for g, comps in enumerate(groups):
        with ablate(tiny_llama, comps, positions="rest"):
            alone = tiny_llama(input_ids=ids).logits
        torch.testing.assert_close(batched[2 * g:2 * g + 2], alone, rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="batch of 2 rows"), ablate_rows(tiny_llama, groups, rows=2):
        tiny_llama(input_ids=ids)
    with pytest.raises(InputError, match="positions"), ablate_rows(tiny_llama, groups, rows=2, positions="middle"):
        pass


def test_attribution_is_the_first_order_change(tiny_llama):
    """activation x gradient is the slope of both measures along a small step of each component."""
    a = get_adapter(tiny_llama)
    cands = _candidates(tiny_llama)
    ids = torch.randint(4, 99, (1, 9))  # one row: a "mean" fill moves that row's activation
    acts: dict[Component, torch.Tensor] = {}

    def keep(c: Component, sl: slice):
        def hook(module, args):
            acts.setdefault(c, args[0][0, 0, sl].detach().clone())  # position 0 of the one row
        return hook

    hooks = []
    for c in cands:
        mod = a.mlp_down_module(c.layer) if c.kind == "neuron" else a.output_projection(c.layer)
        sl = slice(c.index, c.index + 1) if c.kind == "neuron" else slice(c.index * a.d_head, (c.index + 1) * a.d_head)
        hooks.append(mod.register_forward_pre_hook(keep(c, sl)))
    with se.eager_attention(tiny_llama):
        base = se.sink_baseline(tiny_llama, ids)
        for h in hooks:
            h.remove()

        def shifted(eps: float) -> dict[Component, object]:  # "mean" ablation to the activation + eps
            return {c: (float(acts[c] + eps) if c.kind == "neuron" else acts[c] + eps) for c in cands}

        est = se.attribution_effects(tiny_llama, base, cands, mode="mean", means=shifted(3e-2))
        up = se.ablation_effects(tiny_llama, base, cands, mode="mean", means=shifted(3e-2))
        down = se.ablation_effects(tiny_llama, base, cands, mode="mean", means=shifted(-3e-2))
    moved = 0
    for c in cands:
        for i, b in enumerate((base.residual, base.attention)):
            slope = (up[c][i] - down[c][i]) / 2  # central difference: the quadratic term cancels
            assert est[c][i] - b == pytest.approx(slope, rel=0.05, abs=1e-6), c.name
            moved += abs(slope) > 1e-4
    assert moved >= 4  # the equalities above are not all about near-zero slopes


def test_pruned_search_keeps_the_exhaustive_top_k(tiny_tok):
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(1)
    text = torch.randint(4, 99, (4, 16), generator=g).tolist()
    stats = neuron_stats(model, text)
    kw = {"ratio": 0.0, "floor": 0.0, "per_layer": 6}
    full = localise_sink_circuit(model, tiny_tok, text, stats, exact=None, **kw)
    n = len(full.components)
    assert n == 2 * 4 + 2 * 6 and full.settings["search"] == "exhaustive"
    key = [(c.layer, c.kind, c.index) for c in full.components]
    effect = {(c.layer, c.kind, c.index): c.effect for c in full.components}
    # no group is nonlinear at an infinite tolerance: exactly the `exact` largest estimates are ablated
    pruned = localise_sink_circuit(model, tiny_tok, text, stats, exact=6, linear_tol=float("inf"), **kw)
    assert pruned.settings["search"] == "pruned by attribution" and pruned.settings["candidates"] == n
    assert pruned.settings["ablated_exactly"] == 6 and pruned.settings["nonlinear_groups"] == []
    k = 3
    assert [(c.layer, c.kind, c.index) for c in pruned.components[:k]] == key[:k]
    for c in pruned.components:  # the same exact numbers where both ablated
        if c.exact:
            assert c.effect == pytest.approx(effect[(c.layer, c.kind, c.index)], rel=1e-5, abs=1e-7)
    exact = [c.exact for c in pruned.components]
    assert exact == sorted(exact, reverse=True) and exact.count(True) == 6
    assert all(math.isnan(c.effect) and not math.isnan(c.estimate) for c in pruned.components if not c.exact)
    # at zero tolerance every group fails the linearity check: every candidate is ablated, as in the full search
    strict = localise_sink_circuit(model, tiny_tok, text, stats, exact=6, linear_tol=0.0, **kw)
    assert len(strict.settings["nonlinear_groups"]) == 4 and strict.settings["ablated_exactly"] == n
    assert [(c.layer, c.kind, c.index) for c in strict.components] == key
    # the default tolerance: the nonlinear groups' members are all exact; the top-k is the exhaustive one
    default = localise_sink_circuit(model, tiny_tok, text, stats, exact=6, **kw)
    nonlinear = default.settings["nonlinear_groups"]
    for c in default.components:
        if f"L{c.layer} {c.kind}s" in nonlinear:
            assert c.exact
    assert [(c.layer, c.kind, c.index) for c in default.components[:k]] == key[:k]
    # with no more candidates than `exact`, the search is exhaustive
    same = localise_sink_circuit(model, tiny_tok, text, stats, exact=n, **kw)
    assert same.settings["search"] == "exhaustive" and [c.effect for c in same.components] == pytest.approx(
        [c.effect for c in full.components], rel=1e-5, abs=1e-7)
    with pytest.raises(InputError, match="exact"):
        localise_sink_circuit(model, tiny_tok, text, stats, exact=0, **kw)


def test_linearity_check_catches_a_threshold(tiny_llama):
    """A component whose effect a gradient cannot see: its group fails the check and is ablated exactly."""
    a = get_adapter(tiny_llama)
    cands = [Component(0, "head", h) for h in range(a.n_heads)] + [Component(0, "neuron", j) for j in (1, 7)]
    ids = torch.randint(4, 99, (2, 9))
    threshold = Component(0, "head", 2)
    sl = slice(2 * a.d_head, 3 * a.d_head)

    bump = 3.0 * torch.randn(a.d_model)

    def switch(module, args, out):  # the head's output at token 0 matters only once it is gone (args: ablated)
        gone = args[0][:, :1, sl].abs().amax(dim=-1, keepdim=True) < 1e-6  # (B, 1, 1)
        return torch.cat([torch.where(gone, out[:, :1] + bump, out[:, :1]), out[:, 1:]], dim=1)

    handle = a.output_projection(0).register_forward_hook(switch)
    try:
        found = se.search_effects(tiny_llama, ids, cands, exact=1)
        exhaustive = se.search_effects(tiny_llama, ids, cands, exact=None)
    finally:
        handle.remove()
    heads = next(g for g in found.groups if g["kind"] == "head")
    assert not heads["linear"] and threshold in found.exact
    est, true = found.shares(found.estimates[threshold]), found.shares(found.exact[threshold])
    assert max(abs(e - t) for e, t in zip(est, true)) > 0.01  # the jump is invisible to the gradient
    assert found.exact[threshold] == pytest.approx(exhaustive.exact[threshold], rel=1e-6)


@torch.no_grad()
def test_run_activations_come_from_the_prefill(tiny_llama, tiny_tok):
    """Each prompt's row is found among generation's (reordered, left-padded) prefill batches, and its last
    positions equal an unpadded forward of that prompt alone."""
    a = get_adapter(tiny_llama)
    prompts = [build_prompt(tiny_tok, w, n, "instruct").ids for w, n in (("cat", 6), ("dog", 9), ("poem", 7))]
    outs, got = _run_captures(tiny_llama, prompts, [0, 1], 4, 3, 2, lambda *_: None)
    assert len(outs) == len(got) == 3
    for p, g in zip(prompts, got):
        seen: dict[str, torch.Tensor] = {}
        hooks = [a.mlp_down_module(1).register_forward_pre_hook(lambda m, args, s=seen: s.__setitem__("n", args[0])),
                 a.output_projection(0).register_forward_pre_hook(lambda m, args, s=seen: s.__setitem__("h", args[0]))]
        tiny_llama(input_ids=torch.tensor([p]))
        for h in hooks:
            h.remove()
        torch.testing.assert_close(g[("n", 1)], seen["n"][0, -4:], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g[("h", 0)], seen["h"][0, -4:], rtol=1e-4, atol=1e-5)


def test_quantile_dim0_is_torch_quantile():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 100, 3001):
        x = torch.randn(n, 7, generator=g)
        for q in (0.0, 0.25, 0.5, 0.9, 0.999, 1.0):
            assert torch.equal(quantile_dim0(x, q), torch.quantile(x, q, dim=0)), (n, q)


def test_cli_circuit_says_how_it_searched(tiny_dir, tmp_path, capsys):
    from sinkscope.cli.__main__ import main

    args = ["repeat", "circuit", "--model", str(tiny_dir), "--words", "cat", "--n", "6", "--max-new-tokens", "2",
            "--per-layer", "3"]
    assert main([*args, "--out", str(tmp_path / "pruned"), "--exact", "2"]) == 0
    out, err = capsys.readouterr()
    assert "search: pruned by attribution" in out and "circuit: ablating candidates" in err  # phase lines (no tty)
    settings = json.loads((tmp_path / "pruned" / "circuit.json").read_text())["settings"]
    assert settings["search"] == "pruned by attribution" and settings["exact"] == 2
    assert main([*args, "--out", str(tmp_path / "all"), "--exhaustive"]) == 0
    assert "search: exhaustive" in capsys.readouterr().out
    d = json.loads((tmp_path / "all" / "circuit.json").read_text())
    assert d["settings"]["ablated_exactly"] == d["settings"]["candidates"] == len(d["components"])
    assert main([*args, "--out", str(tmp_path / "bad"), "--exact", "0"]) == 2
    assert "--exact" in capsys.readouterr().err
