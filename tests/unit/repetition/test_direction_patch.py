"""The gated first-token-direction patch on a tiny Llama: the repetition gate against a brute-force reference,
edits only inside repetitions, KV cache and left padding, generate, manifest round trip, and the builder."""

from __future__ import annotations

import json

import pytest
import torch

import sinkscope
from sinkscope.errors import InputError
from sinkscope.inputs import pad_batch
from sinkscope.interventions.patch import (
    DirectionRule,
    NeuronRule,
    RepetitionGate,
    SinkPatch,
    apply_patch,
    read_patch,
    repetition_gate,
    save_patch,
)
from sinkscope.models.load import MANIFEST_NAME
from sinkscope.repetition.direction import (
    FirstTokenDirections,
    build_direction_patch,
    choose_layer,
    first_token_directions,
)


def _gate_reference(emb: torch.Tensor, seq: list[int], gate: RepetitionGate) -> list[bool]:
    """Brute force on one unpadded row: position t open iff t >= window and mean cos with the window >= min_cos."""
    e = torch.nn.functional.normalize(emb[torch.tensor(seq)].float(), dim=-1)
    out = []
    for t in range(len(seq)):
        if t < gate.window:
            out.append(False)
            continue
        out.append(bool((e[t - gate.window:t] @ e[t]).mean() >= gate.min_cos))
    return out


def _seq_with_run(prefix: int, word: int, n: int, after: int = 0, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(4, 99, (prefix,), generator=g).tolist() + [word] * n
            + torch.randint(4, 99, (after,), generator=g).tolist())


def test_repetition_gate_matches_brute_force_across_calls_and_padding():
    emb = torch.randn(99, 16)
    gate = RepetitionGate(window=5, min_cos=0.8)
    seqs = [_seq_with_run(6, 7, 12, 4, seed=1), _seq_with_run(3, 9, 8, 0, seed=2), _seq_with_run(10, 5, 2, 3)]
    ids, mask = pad_batch(seqs, 0, side="left")
    T = ids.shape[1]
    ref = [_gate_reference(emb, s, gate) for s in seqs]
    # the whole prompt in one call, then the same split into a prefill and single-token steps
    tail = (torch.zeros(3, 5, dtype=torch.long), torch.zeros(3, 5, dtype=torch.long))
    whole = repetition_gate(emb, ids, mask, *tail, gate)
    got = [[], [], []]
    cut = 9
    step_tail = tail
    for lo, hi in [(0, cut)] + [(t, t + 1) for t in range(cut, T)]:
        g = repetition_gate(emb, ids[:, lo:hi], mask[:, lo:hi], *step_tail, gate)
        for b in range(3):
            got[b] += g[b].tolist()
        step_tail = (torch.cat([step_tail[0], ids[:, lo:hi]], 1)[:, -5:],
                     torch.cat([step_tail[1], mask[:, lo:hi]], 1)[:, -5:])
    for b, s in enumerate(seqs):
        assert whole[b, T - len(s):].tolist() == ref[b]
        assert not whole[b, :T - len(s)].any()  # padding never opens
        assert got[b][T - len(s):] == ref[b]
    assert sum(map(sum, ref)) >= 10  # the runs did open it


def _direction_patch(model, *, gate: RepetitionGate | None = RepetitionGate(4, 0.9)) -> SinkPatch:
    """A strong direction edit (threshold -inf: fires wherever allowed) on every layer."""
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    rules = []
    for l in range(model.config.num_hidden_layers):
        u = torch.randn(d, generator=g)
        rules.append(DirectionRule(l, (u / u.norm()).tolist(), -1e9, 5.0))
    return SinkPatch([], "unused", directions=rules, gate=gate)


@torch.no_grad()
def test_direction_patch_edits_only_inside_repetitions(tiny_llama):
    seq = _seq_with_run(8, 7, 10, 0)
    ids = torch.tensor([seq])
    base = tiny_llama(input_ids=ids).logits
    with apply_patch(tiny_llama, _direction_patch(tiny_llama)) as h:
        pat = tiny_llama(input_ids=ids).logits
        assert h.n_gated == 10 - 4 and h.n_clamped == (10 - 4) * tiny_llama.config.num_hidden_layers
    changed = (pat - base).abs().amax(-1)[0] > 1e-4
    assert not changed[:8 + 4].any() and changed[8 + 4:].all()  # prefix and the run's first `window` copies kept
    with apply_patch(tiny_llama, _direction_patch(tiny_llama, gate=None)):
        ungated = tiny_llama(input_ids=ids).logits
    torch.testing.assert_close(ungated[:, 0], base[:, 0])  # never the first token
    assert ((ungated - base).abs().amax(-1)[0, 1:] > 1e-4).all()
    torch.testing.assert_close(tiny_llama(input_ids=ids).logits, base)  # hooks removed


@torch.no_grad()
def test_direction_patch_kv_cache_and_left_padding_match_full_forward(tiny_llama, padded_and_cached_match):
    seqs = [_seq_with_run(5, 7, 9, 0, 1), _seq_with_run(2, 11, 7, 0, 2), _seq_with_run(3, 13, 2, 0, 3)]
    with apply_patch(tiny_llama, _direction_patch(tiny_llama)):
        padded_and_cached_match(tiny_llama, seqs, 4)


@torch.no_grad()
def test_direction_patch_generate_batched_equals_unbatched(tiny_llama, batched_generate_matches):
    seqs = [_seq_with_run(4, 7, 9, 0, 1), _seq_with_run(2, 11, 6, 0, 2)]
    with apply_patch(tiny_llama, _direction_patch(tiny_llama)):
        patched = batched_generate_matches(tiny_llama, seqs, 6)
    ids, mask = pad_batch(seqs, 0, side="left")
    plain = tiny_llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                pad_token_id=0)[:, ids.shape[1]:]
    assert plain.tolist() != patched.tolist()


@torch.no_grad()
def test_direction_patch_manifest_round_trip_and_version1(tiny_llama, tiny_dir, tmp_path):
    patch = SinkPatch([NeuronRule(0, [1, 2], [0.5, 0.5], [0.0, 0.0])], str(tiny_dir),
                      directions=_direction_patch(tiny_llama).directions, gate=RepetitionGate(4, 0.9))
    out = save_patch(patch, tmp_path / "p")
    back = read_patch(out)
    assert back.directions == patch.directions and back.gate == patch.gate and back.rules == patch.rules
    model, _ = sinkscope.load_model(out)
    ids = torch.tensor([_seq_with_run(3, 7, 8)])
    with apply_patch(tiny_llama, patch):
        expected = tiny_llama(input_ids=ids).logits
    torch.testing.assert_close(model(input_ids=ids).logits, expected)
    # a version-1 manifest (neuron rules only, no gate) still loads
    v1 = json.loads((out / MANIFEST_NAME).read_text())
    for key in ("directions", "gate"):
        v1.pop(key)
    v1["version"] = 1
    (out / MANIFEST_NAME).write_text(json.dumps(v1))
    old = read_patch(out)
    assert old.directions == [] and old.gate is None and old.rules == patch.rules


def test_bad_rules_are_one_line_errors(tiny_llama):
    with pytest.raises(InputError, match="width"):
        apply_patch(tiny_llama, SinkPatch([], "x", directions=[DirectionRule(0, [1.0, 0.0], 0.0, 0.0)]))
    with pytest.raises(InputError, match="layer 99"):
        apply_patch(tiny_llama, SinkPatch([], "x", directions=[DirectionRule(99, [1.0] * 64, 0.0, 0.0)]))
    with pytest.raises(InputError, match="window"):
        RepetitionGate(0, 0.5)


@torch.no_grad()
def test_first_token_directions_against_plain_computation(tiny_llama):
    seqs = [torch.randint(4, 99, (n,)).tolist() for n in (9, 6, 12)]
    dirs = first_token_directions(tiny_llama, seqs, batch_size=2)
    hs = [tiny_llama(input_ids=torch.tensor([s]), output_hidden_states=True).hidden_states for s in seqs]
    for l in range(tiny_llama.config.num_hidden_layers - 1):  # the last hidden state carries the final norm
        first = torch.stack([h[l + 1][0, 0] for h in hs]).mean(0)
        other = torch.cat([h[l + 1][0, 1:] for h in hs]).mean(0)
        u = (first - other) / (first - other).norm()
        torch.testing.assert_close(dirs.direction[l], u, atol=1e-4, rtol=1e-4)
        proj = torch.cat([h[l + 1][0, 1:] @ u for h in hs])
        assert dirs.median[l] == pytest.approx(float(proj.median()), abs=1e-3)
        assert dirs.max[l] == pytest.approx(float(proj.max()), abs=1e-3)
    assert dirs.n_positions == 9 + 6 + 12 - 3


def test_choose_layer_takes_the_earliest_near_best_layer():
    dirs = FirstTokenDirections([torch.ones(2)] * 4, [9.0] * 4, [0.0] * 4, [1.0, 2.0, 1.0, 1.0], [3.0] * 4, 10)
    layer, scores = choose_layer(dirs, torch.tensor([[2.0, 10.0, 9.5, 10.0], [2.0, 10.0, 9.5, 10.0]]))
    assert scores == [2.0, 5.0, 9.5, 10.0] and layer == 2
    with pytest.raises(InputError, match="do not move"):
        choose_layer(dirs, torch.zeros(1, 4))


def test_build_direction_patch_on_tiny_model(tiny_llama, tiny_tok):
    seqs = [torch.randint(4, 99, (n,)).tolist() for n in (10, 8)]
    patch, report = build_direction_patch(tiny_llama, tiny_tok, seqs, ["poem", "cat"], base_model="x", n=12,
                                          layer=1, window=4, min_cos=0.9)
    (rule,) = patch.directions
    assert rule.layer == 1 and patch.gate == RepetitionGate(4, 0.9)
    assert abs(torch.tensor(rule.direction).norm() - 1) < 1e-5
    assert rule.threshold == pytest.approx(report.ordinary["q90"][1]) and rule.value == report.ordinary["median"][1]
    assert len(report.scores) == tiny_llama.config.num_hidden_layers and len(report.run_projection) == 2
    with apply_patch(tiny_llama, patch):  # installs and runs
        tiny_llama(input_ids=torch.tensor([seqs[0]]))


def test_dedup_mask_against_loops():
    from sinkscope.interventions.patch import dedup_mask

    flags = torch.tensor([[0, 0, 1, 1, 0, 1, 1], [0, 0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    mask2d = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]])
    got = dedup_mask(flags, mask2d, 3, torch.float32)[:, 0]  # (B, 3, 7): the last 3 positions query
    low = torch.finfo(torch.float32).min
    for b in range(2):
        for i, q in enumerate(range(4, 7)):
            c = int(flags[b, :q + 1].sum())
            for k in range(7):
                if k > q or not mask2d[b, k]:
                    assert got[b, i, k] == low
                elif flags[b, k]:
                    assert got[b, i, k] == pytest.approx(-torch.log(torch.tensor(float(c))).item())
                else:
                    assert got[b, i, k] == 0


def _dedup(model, window: int = 4) -> SinkPatch:
    return SinkPatch([], "unused", gate=RepetitionGate(window, 0.9), attention_dedup=True)


@torch.no_grad()
def test_dedup_leaves_ordinary_text_identical_and_changes_runs_after_the_gate(tiny_llama):
    plain = torch.randint(4, 99, (2, 20))
    base = tiny_llama(input_ids=plain).logits
    with apply_patch(tiny_llama, _dedup(tiny_llama)) as h:
        assert torch.equal(tiny_llama(input_ids=plain).logits, base) and h.n_gated == 0
    seq = torch.tensor([_seq_with_run(6, 7, 12)])
    base = tiny_llama(input_ids=seq).logits
    with apply_patch(tiny_llama, _dedup(tiny_llama)):
        pat = tiny_llama(input_ids=seq).logits
    changed = (pat - base).abs().amax(-1)[0] > 1e-5
    # the gate opens at the run's 5th copy; that key is the first flagged one, so c = 1 and nothing changes yet
    assert not changed[:6 + 5].any() and changed[6 + 5:].all()


@torch.no_grad()
def test_dedup_kv_cache_left_padding_and_generate(tiny_llama, padded_and_cached_match, batched_generate_matches):
    seqs = [_seq_with_run(5, 7, 12, 0, 1), _seq_with_run(2, 11, 9, 0, 2), _seq_with_run(3, 13, 2, 0, 3)]
    patch = SinkPatch([], "unused", directions=_direction_patch(tiny_llama).directions,
                      gate=RepetitionGate(4, 0.9), attention_dedup=True)
    with apply_patch(tiny_llama, patch):
        padded_and_cached_match(tiny_llama, seqs, 5)
        batched_generate_matches(tiny_llama, seqs, 5)


def test_dedup_needs_a_gate_and_round_trips(tiny_dir, tmp_path):
    with pytest.raises(InputError, match="gate"):
        SinkPatch([], "x", attention_dedup=True)
    from sinkscope.repetition.patch_methods import dedup_patch

    p = dedup_patch(base_model=str(tiny_dir), window=8, min_cos=0.7)
    back = read_patch(save_patch(p, tmp_path / "d"))
    assert back.attention_dedup and back.gate == RepetitionGate(8, 0.7) and back.directions == []
    assert "attention to repeated keys counted once" in back.describe()


def test_patch_cli_dedup_method_and_bad_method(tiny_dir, tmp_path, capsys):
    from sinkscope.cli.__main__ import main

    assert main(["repeat", "patch", "--method", "dedup", "--model", str(tiny_dir), "--save", str(tmp_path / "p"),
                 "--window", "16"]) == 0
    p = read_patch(tmp_path / "p")
    assert p.attention_dedup and p.gate == RepetitionGate(16, 0.8)
    model, _ = sinkscope.load_model(tmp_path / "p")
    assert model.sinkscope_patch.patch.attention_dedup
    assert main(["repeat", "patch", "--method", "bogus", "--model", str(tiny_dir), "--save", str(tmp_path / "q")]) == 2
    assert "unknown --method 'bogus'" in capsys.readouterr().err
