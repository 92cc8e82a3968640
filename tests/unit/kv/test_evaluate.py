"""The `kv eval` harness on tiny models: the dense row is a plain forward, cells resume, KL and agreement are
measured against dense, bytes are the stored tensors'."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from sinkscope.compat import cache_kwargs
from sinkscope.io import read_jsonl
from sinkscope.kv.evaluate import (
    CELLS_FILE,
    EvalOptions,
    Method,
    MethodContext,
    build_methods,
    evaluate,
    measure_cell,
    stored_bytes,
    stream_logits,
    summarize,
    summary_markdown,
)
from sinkscope.kv.suite import SuiteSpec, build_suite
from sinkscope.models.random_hf import tiny_model
from sinkscope.streaming.cache import sink_cache

from .conftest import CODE, PROSE


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _suite(tok, tasks=("passkey", "prose", "agree"), length=320):
    spec = SuiteSpec(lengths=(length,), depths=(0.3,), tasks=tasks, n_streams=1, n_agree=1)
    return build_suite(tok, spec, prose=PROSE, code=CODE)


def _dense(model):
    return build_methods(model, ["dense"], MethodContext(None, (), (), 4))[0]


def test_dense_stream_row_equals_a_plain_forward(model, char_tokenizer):
    item = _suite(char_tokenizer, ("prose",)).items[0]
    logprobs, kv = stream_logits(model, _dense(model), item, chunk=48)  # chunked prefill, then the tail
    with torch.no_grad():
        plain = model(torch.tensor([item.ids])).logits[0].float().log_softmax(-1)
    c = item.context_len
    assert logprobs.shape == (item.length - c, plain.shape[-1])
    torch.testing.assert_close(logprobs, plain[c - 1:-1], atol=1e-5, rtol=1e-5)
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    assert kv == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (item.length - 1) * d * 4


def test_dense_greedy_answer_equals_recomputing_the_whole_prompt(model, char_tokenizer):
    item = _suite(char_tokenizer, ("passkey",)).items[0]
    row = measure_cell(model, char_tokenizer, _dense(model), item, EvalOptions(chunk=37, answer_tokens=6))
    ids = list(item.ids)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert row["generated"] == ids[item.length:]
    assert row["correct"] is False or row["continuation"].strip().startswith(item.answer)
    assert row["decode_s_per_token"] > 0


def _copy_method():
    """A dense cache under another name: every comparison with dense must come out exactly equal."""
    return Method("copy", 0.5, None, lambda m, n: DynamicCache(config=m.config))


def _sinks_method(window):
    return Method("sinks", 0.25, None, lambda m, n: sink_cache(m, 2, window, reassign=False),
                  info={"note": "test"})


def test_kl_and_agreement_are_measured_against_dense(model, char_tokenizer, tmp_path):
    suite = _suite(char_tokenizer)
    methods = [_copy_method(), _sinks_method(8), _dense(model)]  # dense is run first whatever the order
    result = evaluate(model, char_tokenizer, suite, methods, tmp_path, EvalOptions(chunk=64, agree_tokens=6))
    by = {(c["method"], c["task"]): c for c in result.cells}
    assert [c["method"] for c in result.cells][:3] == ["dense"] * 3
    assert by["copy", "prose"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert by["copy", "prose"]["nll"] == pytest.approx(by["dense", "prose"]["nll"], abs=1e-5)
    assert by["copy", "agree"]["agreement"] == 1.0
    assert by["copy", "passkey"]["generated"] == by["dense", "passkey"]["generated"]
    assert by["sinks", "prose"]["kl"] > 1e-5  # 2 sinks + 8 recent of 320 tokens: other predictions
    assert by["sinks", "prose"]["kv_bytes"] < by["dense", "prose"]["kv_bytes"] / 5
    assert by["sinks", "passkey"]["bytes_fraction"] == pytest.approx(
        by["sinks", "passkey"]["kv_bytes"] / by["dense", "passkey"]["kv_bytes"])
    agree = by["sinks", "agree"]["agreement"]
    dense_tokens = by["dense", "agree"]["generated"]
    assert agree == sum(a == b for a, b in zip(by["sinks", "agree"]["generated"], dense_tokens)) / 6


def test_cells_resume_and_settings_change_the_key(model, char_tokenizer, tmp_path):
    suite = _suite(char_tokenizer, ("passkey", "prose"))
    calls = []
    first = evaluate(model, char_tokenizer, suite, [_dense(model)], tmp_path, EvalOptions(chunk=64),
                     settings={"model": "tiny"}, progress=lambda d, t, w: calls.append((d, t)))
    assert calls[-1] == (2, 2)
    lines = (tmp_path / CELLS_FILE).read_text().splitlines()
    again = evaluate(model, char_tokenizer, suite, [_dense(model)], tmp_path, EvalOptions(chunk=64),
                     settings={"model": "tiny"})
    assert (tmp_path / CELLS_FILE).read_text().splitlines() == lines  # nothing measured twice
    assert [c["cell"] for c in again.cells] == [c["cell"] for c in first.cells]
    evaluate(model, char_tokenizer, suite, [_dense(model)], tmp_path, EvalOptions(chunk=32),
             settings={"model": "tiny"})
    assert len(read_jsonl(tmp_path / CELLS_FILE)) == 4  # another chunk size: other cells
    # a torn last line (a killed run) is measured again
    (tmp_path / CELLS_FILE).write_text("\n".join(lines[:1]) + "\n" + lines[1][:20])
    evaluate(model, char_tokenizer, suite, [_dense(model)], tmp_path, EvalOptions(chunk=64),
             settings={"model": "tiny"})
    assert len(read_jsonl(tmp_path / CELLS_FILE)) == 2


def test_stored_bytes_counts_tensors_and_prefers_the_cache_own_count(model):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.arange(4, 24)[None], use_cache=True, **cache_kwargs(model, cache))
    expect = sum(t.numel() * 4 for layer in cache.layers for t in (layer.keys, layer.values))
    assert stored_bytes(cache) == expect > 0

    class Own:
        def stored_bytes(self):
            return 123

    assert stored_bytes(Own()) == 123 and stored_bytes(None) == 0


def stored_bytes_dense(model, length):
    cfg = model.config
    d_head = cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * length * d_head * 4


def _cell(method, task, budget=None, seed=None, **kw):
    base = {"method": method, "task": task, "budget": budget, "seed": seed, "length": 64, "kv_bytes": 100,
            "bytes_fraction": 1.0 if method == "dense" else 0.25, "peak_rss_mb": 1.0}
    return {**base, **kw}


def test_summary_averages_seeds_and_tasks():
    cells = [_cell("dense", "passkey", correct=True), _cell("dense", "passkey", correct=True),
             _cell("dense", "prose", kl=0.0, ppl=10.0, decode_s_per_token=None),
             _cell("random", "passkey", 0.25, 0, correct=True), _cell("random", "passkey", 0.25, 0, correct=False),
             _cell("random", "passkey", 0.25, 1, correct=False), _cell("random", "passkey", 0.25, 1, correct=False),
             _cell("random", "prose", 0.25, 0, kl=0.2), _cell("random", "code", 0.25, 1, kl=0.4)]
    rows = summarize(cells)
    assert [(r["method"], r["budget"]) for r in rows] == [("dense", None), ("random", 0.25)]
    dense, rnd = rows
    assert dense["passkey_acc"] == 1.0 and dense["prose_ppl"] == 10.0 and dense["multikey_acc"] is None
    assert rnd["n_seeds"] == 2 and rnd["passkey_acc"] == 0.25
    assert (rnd["passkey_acc_min"], rnd["passkey_acc_max"]) == (0.0, 0.5)
    assert rnd["stream_kl"] == pytest.approx(0.3) and rnd["prose_kl"] == pytest.approx(0.2)
    table = summary_markdown(rows).splitlines()
    assert len(table) == 4 and table[3].startswith("| random (mean of 2 seeds) | 0.25 | 64 | 0.250 | 0.25 |")
    assert math.isnan(float("nan"))


def test_policy_methods_need_a_policy(model):
    from sinkscope.errors import InputError

    with pytest.raises(InputError, match="--policy"):
        build_methods(model, ["policy"], MethodContext(None, (0.25,), (0,), 4))


@pytest.mark.parametrize("name", ["uniform", "policy", "random"])
def test_headwise_methods_equal_the_policy_masked_dense_forward(model, char_tokenizer, name):
    """Each head-wise method's scored stream equals one plain forward under its policy's per-head mask (the
    reference of `sinkscope.kv.attention`), through the harness's chunked prefill and tail."""
    pytest.importorskip("sinkscope.kv.cache")  # the head-wise cache (branch kv) is merged beside this harness
    from sinkscope.kv.attention import policy_masked
    from sinkscope.kv.policy import KVPolicy

    scores = torch.rand(2, 2, 3, generator=torch.Generator().manual_seed(0)).numpy()
    calibrated = KVPolicy.from_scores(scores, 0.5, 2, 16, 320, model=model)
    ctx = MethodContext(policy=calibrated, budgets=(0.5,), seeds=(1,), n_sink=2)
    method = build_methods(model, [name], ctx)[0]
    item = _suite(char_tokenizer, ("prose",)).items[0]
    logprobs, kv = stream_logits(model, method, item, chunk=50)
    policy = method.policy_for(item.length)
    with torch.no_grad(), policy_masked(model, policy):
        plain = model(torch.tensor([item.ids]), use_cache=False).logits[0].float().log_softmax(-1)
    torch.testing.assert_close(logprobs, plain[item.context_len - 1:-1], atol=1e-5, rtol=1e-5)
    from sinkscope.kv.policy import n_full_for_budget

    assert policy.n_full == (0 if name == "uniform" else n_full_for_budget(0.5, 4, 2, 16, 320))
    assert kv < stored_bytes_dense(model, item.length) * 0.6
