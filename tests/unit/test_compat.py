"""The transformers-version shim: the KV cache is found and passed whatever the installed release calls it.

CI runs the unit tier on the lowest supported transformers and the whole suite on the newest, so these tests run
once per supported keyword (``past_key_values`` up to 5.2x, ``cache`` from 5.24).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from transformers import DynamicCache

from sinkscope.compat import cache_keyword, cache_kwargs, cached_length, find_cache, output_cache
from sinkscope.models.random_hf import tiny_model


def test_cache_keyword_reads_the_signature() -> None:
    def new(input_ids=None, cache=None): ...
    def old(input_ids=None, past_key_values=None): ...
    def neither(input_ids=None, **kwargs): ...

    assert cache_keyword(new) == "cache"
    assert cache_keyword(old) == "past_key_values"
    assert cache_keyword(neither) == "past_key_values"


@pytest.mark.parametrize("keyword", ["cache", "past_key_values", "some_future_name"])
def test_find_cache_by_type_whatever_the_keyword(keyword: str) -> None:
    c = DynamicCache()
    assert find_cache({keyword: c, "use_cache": True}) is c
    assert find_cache({}, (torch.zeros(1), c)) is c
    assert find_cache({"cache": None, "attention_mask": torch.ones(1, 3)}) is None
    assert cached_length(None) == 0


def test_hooks_see_the_cache_the_installed_transformers_passes() -> None:
    """A decoder pre-hook finds the cache and its length on every cached step, with no deprecation warning."""
    model = tiny_model("llama")
    decoder = model.model
    seen: list[int] = []

    def hook(module, args, kwargs):
        seen.append(cached_length(find_cache(kwargs, args)))

    handle = decoder.register_forward_pre_hook(hook, with_kwargs=True)
    ids = torch.randint(3, 90, (2, 6))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            with torch.no_grad():
                out = model(input_ids=ids[:, :4], use_cache=True)
                cache = output_cache(out)
                assert cache is not None and cached_length(cache) == 4
                model(input_ids=ids[:, 4:5], use_cache=True, **cache_kwargs(model, cache))
                model(input_ids=ids[:, 5:6], use_cache=True, **cache_kwargs(model, cache))
                gen = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0,
                                     **cache_kwargs(model, DynamicCache(config=model.config)))
    finally:
        handle.remove()
    assert seen[:3] == [0, 4, 5]
    assert seen[3:] == [0, 6, 7], f"generate's steps, transformers {transformers.__version__}"
    assert gen.shape == (2, 9)
