"""The per-head ablation on a tiny model: replaying the unchanged layers equals recomputing them, a head whose
output projection is zero changes nothing when toggled, scores equal a plain masked forward, runs resume, and the
ablation-ranked policy keeps the heads with the largest measured gains."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sinkscope.errors import InputError
from sinkscope.io import read_jsonl
from sinkscope.kv.ablate import (
    ROWS_FILE,
    AblationOptions,
    ablate,
    dev_probes,
    heads_markdown,
    load_ablation,
    toggled,
)
from sinkscope.kv.attention import policy_masked
from sinkscope.kv.policy import KVPolicy
from sinkscope.kv.suite import EVAL_SEED_BASE, SuiteSpec, build_suite
from sinkscope.models.adapters import get_adapter
from sinkscope.models.random_hf import tiny_model

from .conftest import CODE, PROSE

LENGTH = 320


def _model(zero=None):
    model = tiny_model("llama", num_hidden_layers=3)
    if zero is not None:  # kv head `zero[1]` of layer `zero[0]` writes nothing: its query heads' W_O columns are 0
        a = get_adapter(model)
        layer, head = zero
        w = a.output_projection(layer).weight
        g = a.n_heads // a.n_kv_heads
        with torch.no_grad():
            w[:, head * g * a.d_head:(head + 1) * g * a.d_head] = 0
    return model


def _base(model):
    a = get_adapter(model)
    scores = np.random.default_rng(0).random((a.n_layers, a.n_kv_heads, 4))
    return KVPolicy.from_scores(scores, 0.4, 2, 12, LENGTH, model=model)


def _probes(tok):
    return dev_probes(tok, OPTIONS, prose=PROSE, code=CODE)


OPTIONS = AblationOptions(length=LENGTH, depths=(0.4,), tasks=("passkey", "prose"), kl_tokens=64)


def test_dev_probes_use_dev_seeds_and_the_eval_suite_refuses_them(char_tokenizer) -> None:
    items = _probes(char_tokenizer)
    assert [it.task for it in items] == ["passkey", "prose"]
    assert all(it.seed < EVAL_SEED_BASE for it in items) and all(len(it.ids) == LENGTH for it in items)
    ev = build_suite(char_tokenizer, SuiteSpec(lengths=(LENGTH,), depths=(0.4,), tasks=("passkey",)), prose=PROSE)
    assert ev.items[0].seed >= EVAL_SEED_BASE and ev.items[0].ids != items[0].ids
    with pytest.raises(InputError, match="split"):
        build_suite(char_tokenizer, SuiteSpec(lengths=(LENGTH,)), prose=PROSE, split="test")
    with pytest.raises(InputError, match="kl_tokens"):
        AblationOptions(length=LENGTH, kl_tokens=LENGTH)


def test_replay_equals_recomputing_and_scores_equal_a_plain_masked_forward(char_tokenizer) -> None:
    model = _model()
    base = _base(model)
    probes = _probes(char_tokenizer)
    fast = ablate(model, char_tokenizer, base, OPTIONS, probes=probes)
    slow = ablate(model, char_tokenizer, base, OPTIONS, probes=probes, replay=False)
    key = lambda r: (r["probe"], r["layer"], r["head"])  # noqa: E731
    slow_rows = {key(r): r for r in slow.rows}
    assert len(fast.rows) == len(probes) * (base.n_heads_total + 2)
    for r in fast.rows:
        s = slow_rows[key(r)]
        for k in ("answer_logp", "kl"):
            if k in r:
                assert r[k] == pytest.approx(s[k], abs=1e-5)
    # one toggled run against a forward written out here: the policy's masked model on the prompt + answer
    passkey = probes[0]
    answer = char_tokenizer(" " + passkey.answer)["input_ids"]
    p = toggled(base, 2, 1)
    with torch.no_grad(), policy_masked(model, p):
        logits = model(torch.tensor([list(passkey.ids) + answer[:-1]])).logits[0, -len(answer):]
    want = float(torch.log_softmax(logits, -1)[torch.arange(len(answer)), torch.tensor(answer)].sum())
    got = next(r for r in fast.rows if key(r) == (passkey.key, 2, 1))
    assert got["answer_logp"] == pytest.approx(want, abs=1e-5)
    assert got["state"] == ("streaming" if 1 in base.full_heads[2] else "full")
    dense = next(r for r in fast.rows if r["layer"] == -2 and r["task"] == "prose")
    assert dense["kl"] == pytest.approx(0.0, abs=1e-7)


def test_a_head_that_writes_nothing_has_no_effect_and_others_do(char_tokenizer) -> None:
    model = _model(zero=(1, 0))
    res = ablate(model, char_tokenizer, _base(model), OPTIONS, probes=_probes(char_tokenizer))
    g = res.gains()
    assert np.abs(g[1, 0]).max() < 1e-6
    others = np.delete(g.reshape(-1, 2), 1 * 2 + 0, axis=0)
    assert (np.abs(others[:, 1]) > 1e-6).sum() >= others.shape[0] - 1  # every other head moves the KL
    table = {(r["layer"], r["head"]): r for r in res.head_table()}
    assert table[(1, 0)]["gain_kl"] == pytest.approx(0.0, abs=1e-6)


def test_rows_resume_and_the_ranked_policy_keeps_the_largest_gains(char_tokenizer, tmp_path) -> None:
    model = _model()
    base = _base(model)
    probes = _probes(char_tokenizer)
    first = ablate(model, char_tokenizer, base, OPTIONS, probes=probes, out=tmp_path, heads=[(0, 0), (0, 1)])
    n_first = len(read_jsonl(tmp_path / ROWS_FILE))
    assert n_first == len(probes) * 4 and len(first.rows) == n_first
    calls = []
    res = ablate(model, char_tokenizer, base, OPTIONS, probes=probes, out=tmp_path,
                 progress=lambda d, t, w: calls.append(w))
    rows = read_jsonl(tmp_path / ROWS_FILE)
    assert len(rows) == len(probes) * (base.n_heads_total + 2)  # only the missing heads were run
    assert not any("L0." in w for w in calls)
    g = res.gains()[..., 1]
    ranked = res.ranked_policy("gain_kl")
    assert ranked.n_full == base.n_full and ranked.info["criterion_column"] == "ablation"
    assert g[ranked.full_matrix()].min() >= g[~ranked.full_matrix()].max()
    res.save(tmp_path)
    md = heads_markdown(load_ablation(tmp_path), "gain_kl").splitlines()
    best = max(res.head_table(), key=lambda r: r["gain_kl"])
    assert len(md) == 2 + base.n_full and md[2].startswith(f"| L{best['layer']}.{best['head']} |")
    ranked.save(tmp_path / "policy")
    again = KVPolicy.load(tmp_path / "policy")
    assert again.scores_array().shape[-1] == 5 and again.full_heads == ranked.full_heads
    comp = res.comparison()
    assert comp["top"] == base.n_full and len(comp["top_heads"]["gain_kl"]) == base.n_full
    assert all(math.isfinite(v) for v in comp["spearman"]["gain_kl"].values() if v is not None)
    with pytest.raises(InputError, match="gain"):
        res.ranked_policy("nope")
