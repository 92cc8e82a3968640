"""Yona et al.'s repeated token as a sink (`sinkscope.repetition.sink_run`) on tiny random Llamas: the profile's
numbers against eager attention and plain hidden states, a uniform-attention model whose sinks are known in closed
form, the Theorem 4.1 convergence on a model built to show it, and resuming."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sinkscope.errors import InputError
from sinkscope.repetition.prompts import build_prompt
from sinkscope.repetition.sink_run import (
    SinkRunOptions,
    first_sink_copy,
    last_hidden_states,
    measure_cell,
    run_sink_runs,
    singleton_distance,
    singleton_state,
)


@torch.no_grad()
def _uniform_attention(model) -> None:
    """Zero every query projection: all scores are 0, so each query attends uniformly to the keys it sees."""
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight.zero_()


def _harmonic(n: int) -> float:
    return sum(1.0 / j for j in range(1, n + 1))


def test_first_sink_copy_skips_copies_seen_by_too_few_queries():
    assert first_sink_copy([0.0, 0.0, 0.6, 1.0], 0.5, 1) == 3
    assert first_sink_copy([0.0, 0.0, 0.6, 1.0], 0.5, 2) == 3  # copy 3 of 4 is seen by 2 queries
    assert first_sink_copy([0.0, 0.0, 0.6, 1.0], 0.5, 3) is None
    assert first_sink_copy([0.49, 0.5], 0.5, 1) == 2  # "reaches" the share: >=


def test_singleton_distance_of_known_vectors():
    b = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    a = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    rel, cos = singleton_distance(a, b)
    assert rel == pytest.approx([0.0, math.sqrt(5.0)])
    assert cos == pytest.approx([1.0, 0.0], abs=1e-12)


@torch.no_grad()
def test_cell_matches_eager_attention_and_hidden_states(tiny_llama, tiny_tok):
    """alpha from the profiler == column means of eager ``output_attentions``; the hooked last-position states ==
    ``output_hidden_states`` (all but the last layer, which HF returns after the final norm)."""
    from sinkscope.capture import attention_probs_eager

    p = build_prompt(tiny_tok, "cat", 12, "repeat-colon")
    h, alpha = last_hidden_states(tiny_llama, p.ids)
    ids = torch.tensor([p.ids])
    att = torch.stack([a[0] for a in attention_probs_eager(tiny_llama, ids)])  # (La, H, T, T)
    T = len(p.ids)
    ref = np.stack([att[:, :, k:, k].mean(-1).numpy() for k in range(T)], axis=-1)  # (La, H, T)
    np.testing.assert_allclose(alpha, ref, atol=2e-6, rtol=1e-5)
    hs = tiny_llama(input_ids=ids, output_hidden_states=True).hidden_states
    for l in range(len(hs) - 2):
        torch.testing.assert_close(h[l], hs[l + 1][0, -1], atol=1e-5, rtol=1e-5)
    single = singleton_state(tiny_llama, tiny_tok, "cat")
    cell = measure_cell(tiny_llama, tiny_tok, "cat", 12, "repeat-colon", single, eps=0.2)
    want = (ref[:, :, p.run_start:] > 0.2).mean(axis=(0, 1))
    np.testing.assert_allclose(cell["share_by_copy"], want, atol=1e-6)
    assert cell["sink0"] == pytest.approx(float((ref[:, :, 0] > 0.2).mean()))


@torch.no_grad()
def test_uniform_attention_sinks_are_the_closed_form(tiny_llama, tiny_tok):
    """Uniform attention: key k of T receives 1/(t+1) from query t, so alpha_k = (H_T - H_k) / (T - k) in every
    head, and a copy is a sink for all heads or none."""
    _uniform_attention(tiny_llama)
    single = singleton_state(tiny_llama, tiny_tok, "dog")
    eps = 0.12
    cell = measure_cell(tiny_llama, tiny_tok, "dog", 9, "repeat-colon", single, eps=eps)
    T, r0 = cell["length"], cell["run_start"]
    alpha = [(_harmonic(T) - _harmonic(k)) / (T - k) for k in range(T)]
    assert cell["share_by_copy"] == [float(a > eps) for a in alpha[r0:]]
    assert cell["sink0"] == float(alpha[0] > eps)
    assert 0 < sum(cell["share_by_copy"]) < len(cell["share_by_copy"])  # eps splits the copies: a real test


@torch.no_grad()
def test_last_copy_converges_to_the_singleton_under_uniform_attention(tiny_llama, tiny_tok):
    """Theorem 4.1 on a model where its premise holds exactly (the prefix's attention share is |P| / (|P| + N)):
    the distance to the one-token sequence falls with N, to a small fraction of its N = 1 value; in the bare form
    N = 1 *is* the one-token sequence (distance 0)."""
    _uniform_attention(tiny_llama)
    single = singleton_state(tiny_llama, tiny_tok, "tree")
    d = {n: max(measure_cell(tiny_llama, tiny_tok, "tree", n, "repeat-colon", single)["distance"])
         for n in (1, 4, 16, 64, 120)}
    assert d[1] > d[4] > d[16] > d[64] > d[120]
    assert d[120] < 0.1 * d[1] and d[64] < 0.5 * d[16], d  # the prefix share 2 / (2 + N) sets the pace
    bare = measure_cell(tiny_llama, tiny_tok, "tree", 1, "bare", single)
    assert max(bare["distance"]) < 1e-6 and min(bare["cosine"]) > 1 - 1e-6


def test_run_resumes_and_refuses_other_settings(tiny_llama, tiny_tok, tmp_path, monkeypatch):
    import sinkscope.repetition.sink_run as sr

    out = tmp_path / "sr"
    first = run_sink_runs(tiny_llama, tiny_tok, ["cat", "dog"], ["repeat-colon"], [1, 4], out)
    assert len((out / "cells.jsonl").read_text().splitlines()) == 4
    calls = []
    real = sr.measure_cell
    monkeypatch.setattr(sr, "measure_cell", lambda *a, **k: calls.append(a[2:5]) or real(*a, **k))
    lines = (out / "cells.jsonl").read_text().splitlines()
    (out / "cells.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # last line torn
    again = run_sink_runs(tiny_llama, tiny_tok, ["cat", "dog"], ["repeat-colon"], [1, 4], out)
    assert calls == [("dog", 4, "repeat-colon")]  # only the torn cell is measured again
    assert again.cells == first.cells
    with pytest.raises(InputError, match="other settings"):
        run_sink_runs(tiny_llama, tiny_tok, ["cat"], ["repeat-colon"], [1], out, options=SinkRunOptions(eps=0.4))
    paths = again.save(out)
    assert all(p.is_file() for p in paths)
    summ = again.summary()
    assert [(r["form"], r["n"], r["words"]) for r in summ] == [("repeat-colon", 1, 2), ("repeat-colon", 4, 2)]


@pytest.mark.parametrize("kwargs, msg", [({"eps": 1.5}, "eps"), ({"share": 0.0}, "--share"),
                                         ({"share": 1.5}, "--share"), ({"min_queries": 0}, "min_queries")])
def test_options_refuse_bad_values(kwargs, msg):
    with pytest.raises(InputError, match=msg):
        SinkRunOptions(**kwargs)


def test_run_refuses_bad_cells_before_measuring(tiny_llama, tiny_tok, tmp_path):
    with pytest.raises(InputError, match="unknown prompt form"):
        run_sink_runs(tiny_llama, tiny_tok, ["cat"], ["nosuch"], [1], tmp_path / "a")
    with pytest.raises(InputError, match="single-token|unknown token|vocabulary"):
        run_sink_runs(tiny_llama, tiny_tok, ["cat", "zebra"], ["bare"], [1], tmp_path / "b")
    with pytest.raises(InputError, match="context"):
        run_sink_runs(tiny_llama, tiny_tok, ["cat"], ["bare"], [100000], tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in "abc")


@torch.no_grad()
def test_bare_run_is_the_singleton_at_every_length(tiny_llama, tiny_tok):
    """With nothing before the run (the tiny tokenizer adds no BOS), every position sees only copies of one value,
    so every layer's state equals the one-token sequence's whatever N and the positions (RoPE rotates q and k only)."""
    single = singleton_state(tiny_llama, tiny_tok, "book")
    for n in (2, 7, 30):
        cell = measure_cell(tiny_llama, tiny_tok, "book", n, "bare", single)
        assert max(cell["distance"]) < 1e-5 and cell["norm_ratio"] == pytest.approx([1.0] * len(single), abs=1e-5)
    colon = measure_cell(tiny_llama, tiny_tok, "book", 30, "repeat-colon", single)
    assert max(colon["distance"]) > 1e-3  # a prefix breaks the identity


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_cell_against_eager_attention(smollm2):
    """SmolLM2-135M, the "Repeat:" form with 24 copies of an EVAL word: the profiler's alpha equals the eager
    attention's column means, the hooked states equal ``output_hidden_states``, and the bare run (SmolLM2 adds no
    BOS) is the one-token sequence at every layer."""
    from sinkscope.capture import attention_probs_eager
    from sinkscope.repetition.words import EVAL_WORDS

    model, tok = smollm2
    word = EVAL_WORDS[0]
    p = build_prompt(tok, word, 24, "repeat-colon")
    h, alpha = last_hidden_states(model, p.ids)
    ids = torch.tensor([p.ids])
    att = torch.stack([a[0] for a in attention_probs_eager(model, ids)]).double()  # (La, H, T, T)
    ref = np.stack([att[:, :, k:, k].mean(-1).numpy() for k in range(len(p.ids))], axis=-1)
    np.testing.assert_allclose(alpha, ref, atol=1e-5, rtol=1e-4)
    hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    for l in range(len(hs) - 2):
        torch.testing.assert_close(h[l], hs[l + 1][0, -1].float(), atol=1e-3, rtol=1e-4)
    single = singleton_state(model, tok, word)
    bare = measure_cell(model, tok, word, 6, "bare", single)
    assert max(bare["distance"]) < 1e-4, bare["distance"]
