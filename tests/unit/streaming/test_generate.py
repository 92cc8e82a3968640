"""Endless generation: constant cache size, deterministic sampling, same tokens as a dense cache before eviction."""

from __future__ import annotations

import itertools

import pytest
from transformers import DynamicCache

from sinkscope.errors import InputError
from sinkscope.models.random_hf import tiny_model
from sinkscope.streaming.generate import stream_generate


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_endless_generation_at_constant_memory(model) -> None:
    gen = stream_generate(model, list(range(3, 23)), n_sink=4, window=16, temperature=1.0, top_k=20, seed=3)
    toks = list(itertools.islice(gen, 80))  # no max_new_tokens: the caller decides when to stop
    assert [t.position for t in toks] == list(range(20, 100))
    assert len({t.kv_bytes for t in toks}) == 1  # the cache was already full after the 20-token prompt
    again = [t.token_id for t in itertools.islice(
        stream_generate(model, list(range(3, 23)), n_sink=4, window=16, temperature=1.0, top_k=20, seed=3), 80)]
    assert [t.token_id for t in toks] == again


def test_greedy_equals_dense_cache_before_eviction(model) -> None:
    prompt = list(range(5, 15))
    ours = [t.token_id for t in stream_generate(model, prompt, n_sink=4, window=40, max_new_tokens=20)]
    dense = [t.token_id for t in stream_generate(model, prompt, max_new_tokens=20,
                                                 cache=DynamicCache(config=model.config))]
    assert ours == dense and len(ours) == 20


def test_stop_ids_and_errors(model) -> None:
    first = next(iter(stream_generate(model, [5, 6, 7], n_sink=1, window=4)))
    toks = list(stream_generate(model, [5, 6, 7], n_sink=1, window=4, max_new_tokens=10, stop_ids={first.token_id}))
    assert len(toks) == 1
    with pytest.raises(InputError):
        next(iter(stream_generate(model, [], n_sink=1, window=4)))
