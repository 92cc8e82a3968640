"""The head-wise cache against the policy's dense per-head-masked forward, on tiny models of every RoPE family."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import DynamicCache

from sinkscope.compat import cache_kwargs
from sinkscope.errors import InputError, UnsupportedArchitectureError
from sinkscope.kv.attention import policy_masked
from sinkscope.kv.cache import HeadwiseCache, headwise_cache
from sinkscope.kv.policy import KVPolicy
from sinkscope.models.adapters import get_adapter
from sinkscope.models.random_hf import tiny_model
from sinkscope.streaming.cache import sink_cache

ATOL = 1e-5
#: llama: GQA 4/2; qwen3: GQA + q/k norms, head_dim 8; gpt_neox: MHA (4 kv heads), partial RoPE;
#: phi3: fused qkv, partial RoPE + GQA
ARCHS = ["llama", "qwen3", "gpt_neox", "phi3"]
T, S, W = 37, 2, 5


def _model(arch: str, **kw: Any):
    if arch == "phi3":
        kw.setdefault("sliding_window", None)  # full attention in every layer
    return tiny_model(arch, **kw)


def _policy(model, n_sink: int = S, window: int = W) -> KVPolicy:
    """Layer 0 keeps its last kv head in full; layer 1 its even heads (a non-contiguous set with 4 kv heads)."""
    a = get_adapter(model)
    full = ((a.n_kv_heads - 1,), tuple(range(0, a.n_kv_heads, 2)))
    return KVPolicy(full, a.n_layers, a.n_kv_heads, n_sink, window, target_length=T)


@torch.no_grad()
def _reference(model, policy: KVPolicy, ids: torch.Tensor) -> torch.Tensor:
    with policy_masked(model, policy):
        return model(ids, use_cache=False).logits


@torch.no_grad()
def _chunked(model, cache, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([model(ids[:, a:a + chunk], **cache_kwargs(model, cache)).logits
                      for a in range(0, ids.shape[1], chunk)], dim=1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk", [1, 6, T])
def test_equals_the_dense_per_head_masked_forward(arch: str, chunk: int) -> None:
    """Token by token (chunk 1), chunked prefill (6) and one prefill (T): every query sees exactly its head's keys."""
    model = _model(arch)
    policy = _policy(model)
    ids = torch.randint(3, 99, (1, T))
    ref = _reference(model, policy, ids)
    cache = headwise_cache(model, policy)
    got = _chunked(model, cache, ids, chunk)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    with torch.no_grad():
        dense = model(ids).logits
    assert (dense - ref).abs().max() > 1e-3  # the policy does change the output: the test can fail
    assert cache.stored_bytes() == round(policy.bytes_fraction(T) * cache.dense_bytes())


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_all_full_equals_dynamic_cache_and_none_full_equals_the_plain_sink_cache(arch: str) -> None:
    model = _model(arch, attn_implementation="eager")
    a = get_adapter(model)
    ids = torch.randint(3, 99, (1, T))
    full = KVPolicy(tuple(tuple(range(a.n_kv_heads)) for _ in range(a.n_layers)), a.n_layers, a.n_kv_heads, S, W, T)
    uniform = KVPolicy.uniform(model, S, W, T)
    torch.testing.assert_close(_chunked(model, headwise_cache(model, full), ids, 1),
                               _chunked(model, DynamicCache(config=model.config), ids, 1), atol=ATOL, rtol=0)
    torch.testing.assert_close(_chunked(model, headwise_cache(model, uniform), ids, 1),
                               _chunked(model, sink_cache(model, S, W, reassign=False), ids, 1), atol=ATOL, rtol=0)


def test_stored_tensors_are_really_smaller() -> None:
    model = _model("llama")
    policy = _policy(model, n_sink=2, window=3)
    cache = headwise_cache(model, policy)
    _chunked(model, cache, torch.randint(3, 99, (1, 30)), 4)
    layer = cache.layers[0]
    assert tuple(layer.keys.shape) == (1, 1, 30, 8)  # one full kv head, every token
    assert tuple(layer.stream_keys.shape) == (1, 1, 5, 8)  # one streaming kv head, 2 sinks + 3 window
    assert layer.stream_pos.tolist() == [0, 1, 27, 28, 29]
    assert cache.stored_bytes() == sum(t.numel() * 4 for l in cache.layers
                                       for t in (l.keys, l.values, l.stream_keys, l.stream_values))


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_generate_equals_the_masked_dense_greedy_decode(arch: str) -> None:
    model = _model(arch)
    policy = _policy(model, n_sink=2, window=4)
    prompt = torch.randint(3, 99, (1, 9))
    n_new = 12
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=n_new, do_sample=False, min_new_tokens=n_new,
                             **cache_kwargs(model, headwise_cache(model, policy)))
        seq = prompt
        for _ in range(n_new):
            nxt = _reference(model, policy, seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert out.tolist() == seq.tolist()


def test_equal_length_rows_equal_each_row_alone_and_padding_is_refused() -> None:
    model = _model("llama")
    policy = _policy(model)
    ids = torch.randint(3, 99, (2, 20))
    both = _chunked(model, headwise_cache(model, policy), ids, 5)
    for r in range(2):
        alone = _chunked(model, headwise_cache(model, policy), ids[r:r + 1], 5)
        torch.testing.assert_close(both[r:r + 1], alone, atol=ATOL, rtol=0)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :3] = 0
    with pytest.raises(InputError, match="padded batches"):
        model(ids, attention_mask=mask, **cache_kwargs(model, headwise_cache(model, policy)))


def test_other_caches_still_run_the_previous_attention() -> None:
    model = _model("llama")
    ids = torch.randint(3, 99, (1, 16))
    with torch.no_grad():
        before = model(ids).logits
        headwise_cache(model, _policy(model))  # switches the attention implementation
        after = model(ids).logits
        dyn = _chunked(model, DynamicCache(config=model.config), ids, 4)
    torch.testing.assert_close(after, before, atol=ATOL, rtol=0)
    torch.testing.assert_close(dyn, before, atol=ATOL, rtol=0)


def test_refuses_wrong_shapes_and_unsupported_models() -> None:
    model = _model("llama")
    with pytest.raises(InputError, match="this model has 2 x 2"):
        headwise_cache(model, KVPolicy(((), (), ()), 3, 2, S, W, T))
    gemma = tiny_model("gemma2")
    a = get_adapter(gemma)
    with pytest.raises(UnsupportedArchitectureError):
        headwise_cache(gemma, KVPolicy.uniform({"n_layers": a.n_layers, "n_kv_heads": a.n_kv_heads}, S, W, T))


def test_crop_before_eviction_is_exact_and_refused_after() -> None:
    model = _model("llama")
    policy = _policy(model, n_sink=2, window=8)
    ids = torch.randint(3, 99, (1, 14))
    cache = headwise_cache(model, policy)
    _chunked(model, cache, ids[:, :8], 8)
    cache.crop(-3)
    got = _chunked(model, cache, ids[:, 5:14], 9)
    ref = _reference(model, policy, ids)[:, 5:]
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    with pytest.raises(InputError, match="evicted"):
        cache.crop(-1)
    assert isinstance(cache, HeadwiseCache)


def test_library_generate_with_chunked_prefill_equals_one_prefill() -> None:
    from sinkscope.kv.generate import generate_with_policy
    from sinkscope.models.random_hf import tiny_tokenizer

    model, tok = _model("llama"), tiny_tokenizer()
    policy = _policy(model, n_sink=2, window=4)
    prompt = " ".join(["the cat is big and the dog is small ."] * 3)
    one = generate_with_policy(model, tok, policy, prompt, max_new_tokens=6)
    chunked = generate_with_policy(model, tok, policy, prompt, max_new_tokens=6, prefill_chunk=5)
    assert chunked.new_ids == one.new_ids and len(one.new_ids) == 6
    assert one.stored_bytes == chunked.stored_bytes < one.dense_bytes


def test_restore_attention_gives_the_model_back_its_implementation() -> None:
    from sinkscope.kv.attention import HEADWISE, restore_attention
    from sinkscope.kv.cache import headwise_cache
    from sinkscope.kv.policy import KVPolicy

    m = tiny_model("llama", attn_implementation="sdpa")
    p = KVPolicy(((0,), ()), n_layers=2, n_kv_heads=2, n_sink=2, window=4, target_length=16)
    headwise_cache(m, p)
    assert m.config._attn_implementation == HEADWISE
    restore_attention(m)
    assert m.config._attn_implementation == "sdpa"
    restore_attention(m)  # a second call changes nothing
    assert m.config._attn_implementation == "sdpa"
