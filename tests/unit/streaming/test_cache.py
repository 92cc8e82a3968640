"""Sink + window cache: parity with the dense cache, with band-masked full forwards, with pre-RoPE slot caches."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer

from sinkscope.compat import cache_kwargs
from sinkscope.errors import InputError, UnsupportedArchitectureError
from sinkscope.models.random_hf import tiny_model
from sinkscope.streaming.cache import RotaryShift, SinkWindowCache, kv_cache_bytes, sink_cache

ATOL = 1e-5
#: llama: GQA (4 heads, 2 kv heads); gpt_neox: partial RoPE (rotary_pct 0.5); phi3: partial RoPE + GQA.
ROPE_ARCHS = ["llama", "gpt_neox", "phi3"]


def _model(arch: str, **kw: Any):
    if arch == "phi3":
        kw.setdefault("sliding_window", None)  # full attention everywhere
    kw.setdefault("attn_implementation", "eager")
    return tiny_model(arch, **kw)


def _stream(model, ids: torch.Tensor, cache: Cache, **kw: Any) -> torch.Tensor:
    """Token-by-token logits (T, V)."""
    with torch.no_grad():
        steps = [model(ids[:, t:t + 1], **cache_kwargs(model, cache), **kw).logits[0] for t in range(ids.shape[1])]
        return torch.cat(steps)


def _band_mask(T: int, n_sink: int, window: int) -> torch.Tensor:
    """(1, 1, T, T) additive mask: query t sees the first n_sink tokens and tokens t-window..t."""
    q, k = torch.arange(T)[:, None], torch.arange(T)[None]
    allowed = (k <= q) & ((k < n_sink) | (k >= q - window))
    mask = torch.zeros(T, T)
    mask[~allowed] = torch.finfo(torch.float32).min
    return mask[None, None]


@pytest.mark.parametrize("arch", ROPE_ARCHS)
@pytest.mark.parametrize("reassign", [True, False])
def test_equals_dense_cache_while_nothing_is_evicted(arch: str, reassign: bool) -> None:
    model = _model(arch)
    ids = torch.randint(3, 99, (1, 12))
    dense = _stream(model, ids, DynamicCache(config=model.config))
    cache = sink_cache(model, n_sink=4, window=8, reassign=reassign)  # capacity 12: never evicts
    streamed = _stream(model, ids, cache)
    assert cache.evicted == 0 and cache.stored_tokens == 12
    torch.testing.assert_close(streamed, dense, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ROPE_ARCHS)
def test_plain_variant_equals_band_masked_full_forward(arch: str) -> None:
    """Without re-assignment, streaming = one full forward where token t sees sinks + the last `window` tokens."""
    model = _model(arch)
    T, S, W = 40, 3, 8
    ids = torch.randint(3, 99, (1, T))
    with torch.no_grad():
        full = model(ids, attention_mask=_band_mask(T, S, W)).logits[0]
    streamed = _stream(model, ids, sink_cache(model, S, W, reassign=False))
    torch.testing.assert_close(streamed, full, atol=ATOL, rtol=0)
    window_only = _stream(model, ids, sink_cache(model, 0, S + W))
    with torch.no_grad():
        full_w = model(ids, attention_mask=_band_mask(T, 0, S + W)).logits[0]
    torch.testing.assert_close(window_only, full_w, atol=ATOL, rtol=0)
    assert (streamed[S + W + 1:] - window_only[S + W + 1:]).abs().max() > 1e-3  # the sinks do change the output


@pytest.mark.parametrize("arch", ROPE_ARCHS)
def test_reassigned_one_layer_equals_recompute_at_slot_positions(arch: str) -> None:
    """With one layer the cached keys do not depend on context, so the StreamingLLM cache must equal a fresh
    forward over [sinks, window, token] at positions 0..n (exactly the slot positions)."""
    model = _model(arch, num_hidden_layers=1)
    T, S, W = 40, 3, 8
    ids = torch.randint(3, 99, (1, T))
    streamed = _stream(model, ids, sink_cache(model, S, W, reassign=True))
    with torch.no_grad():
        for t in range(T):
            ctx = list(range(S)) + list(range(t - W, t + 1)) if t > S + W else list(range(t + 1))
            ref = model(ids[:, ctx]).logits[0, -1]
            torch.testing.assert_close(streamed[t], ref, atol=ATOL, rtol=0)


class _PreRopeSlotLayer(DynamicLayer):
    """Reference StreamingLLM layer: keys stored *before* RoPE, rotated at their cache slot on every forward.

    The model is fed ``position_ids`` = cache slots, so incoming keys are un-rotated by their slot."""

    def __init__(self, n_sink: int, window: int, rotary: RotaryShift) -> None:
        super().__init__()
        self.n_sink, self.window, self.rotary = n_sink, window, rotary

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        L, q = (self.keys.shape[-2] if self.keys.dim() == 4 else 0), key_states.shape[-2]
        raw_new = torch.cat([self.rotary.rotate(key_states[..., i:i + 1, :], -(L + i)) for i in range(q)], dim=-2)
        raw = torch.cat([self.keys, raw_new], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        rotated = torch.cat([self.rotary.rotate(raw[..., j:j + 1, :], j) for j in range(raw.shape[-2])], dim=-2)
        n = raw.shape[-2]
        if n > self.n_sink + self.window:
            keep = list(range(self.n_sink)) + list(range(n - self.window, n))
            raw, kept_v = raw[..., keep, :], values[..., keep, :]
        else:
            kept_v = values
        self.keys, self.values = raw, kept_v
        return rotated, values


def test_reassigned_multilayer_equals_prerope_slot_reference() -> None:
    model = _model("phi3", num_hidden_layers=3)  # GQA + partial RoPE + several layers
    T, S, W = 36, 2, 7
    ids = torch.randint(3, 99, (1, T))
    rotary = RotaryShift.from_model(model)
    ref_cache = Cache(layers=[_PreRopeSlotLayer(S, W, rotary) for _ in range(3)])
    ref = []
    with torch.no_grad():
        for t in range(T):
            slot = ref_cache.get_seq_length()
            ref.append(model(ids[:, t:t + 1], **cache_kwargs(model, ref_cache),
                             position_ids=torch.tensor([[slot]])).logits[0])
    streamed = _stream(model, ids, sink_cache(model, S, W, reassign=True))
    torch.testing.assert_close(streamed, torch.cat(ref), atol=ATOL, rtol=0)
    plain = _stream(model, ids, sink_cache(model, S, W, reassign=False))
    assert (plain[S + W + 2:] - streamed[S + W + 2:]).abs().max() > 10 * ATOL  # re-assignment changes the output


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_rotation_composes_with_the_model_rope(arch: str) -> None:
    model = _model(arch)
    rotary = RotaryShift.from_model(model)
    k = torch.randn(1, 2, 5, 8)
    torch.testing.assert_close(rotary.rotate(rotary.rotate(k, 7), -7), k, atol=1e-6, rtol=0)
    torch.testing.assert_close(rotary.rotate(rotary.rotate(k, 3), 4), rotary.rotate(k, 7), atol=1e-6, rtol=0)
    if arch == "gpt_neox":  # partial RoPE: channels past the rotary dim are untouched
        assert rotary.rotary_dim == 4
        torch.testing.assert_close(rotary.rotate(k, 5)[..., 4:], k[..., 4:], atol=0, rtol=0)


def test_memory_stays_flat_as_the_stream_grows() -> None:
    model = _model("llama")
    S, W = 4, 12
    cache, dense = sink_cache(model, S, W), DynamicCache(config=model.config)
    sizes, dense_sizes = [], []
    with torch.no_grad():
        for t in range(100):
            tok = torch.tensor([[3 + t % 90]])
            model(tok, **cache_kwargs(model, cache))
            model(tok, **cache_kwargs(model, dense))
            sizes.append(kv_cache_bytes(cache))
            dense_sizes.append(kv_cache_bytes(dense))
    per_token = dense_sizes[0]
    assert all(s == (S + W + 1) * per_token for s in sizes[S + W:])  # capacity + the new token's slot
    assert cache.stored_tokens == S + W and cache.get_seq_length() == 100 and cache.evicted == 100 - S - W
    assert dense_sizes[-1] == 100 * per_token


@pytest.mark.parametrize("reassign", [True, False])
def test_ring_buffer_round_trip(reassign: bool) -> None:
    """Leaving the single-token ring buffer (as a prefill chunk does) keeps the exact cache state."""
    model = _model("llama")
    ids = torch.randint(3, 99, (1, 60))
    a, b = sink_cache(model, 3, 7, reassign=reassign), sink_cache(model, 3, 7, reassign=reassign)
    ref = _stream(model, ids, a)
    first = _stream(model, ids[:, :33], b)
    for layer in b.layers:
        layer._linearize()
    assert b.stored_tokens == 10 and b.layers[0].keys.shape[-2] == 10
    rest = _stream(model, ids[:, 33:], b)
    torch.testing.assert_close(torch.cat([first, rest]), ref, atol=ATOL, rtol=0)


def test_chunked_prefill_keeps_the_cache_bounded() -> None:
    from sinkscope.streaming.generate import prefill

    model = _model("llama")
    ids = torch.randint(3, 99, (1, 100))
    cache = sink_cache(model, 4, 12)
    prefill(model, ids, cache, chunk_size=16)
    assert cache.stored_tokens == 16 and cache.get_seq_length() == 100
    # chunk size 1 is token-by-token streaming: identical last logits
    a, b = sink_cache(model, 4, 12), sink_cache(model, 4, 12)
    torch.testing.assert_close(prefill(model, ids, a, chunk_size=1), _stream(model, ids, b)[-1:], atol=ATOL, rtol=0)


def test_works_with_model_generate() -> None:
    from sinkscope.streaming.generate import stream_generate

    model = _model("llama")
    prompt = torch.randint(3, 99, (1, 10))
    cache = sink_cache(model, 4, 12)
    out = model.generate(prompt, **cache_kwargs(model, cache), max_new_tokens=40, do_sample=False, min_new_tokens=40,
                         prefill_chunk_size=4, pad_token_id=0)
    ours = [t.token_id for t in stream_generate(model, prompt[0], n_sink=4, window=12, max_new_tokens=40,
                                                prefill_chunk_size=4)]
    assert out[0, 10:].tolist() == ours
    assert cache.stored_tokens == 16 and cache.evicted > 0


def test_refuses_what_it_cannot_do() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="rotary"):
        sink_cache(tiny_model("gpt2"), 4, 8, reassign=True)
    assert isinstance(sink_cache(tiny_model("gpt2"), 4, 8, reassign=False), SinkWindowCache)
    with pytest.raises(UnsupportedArchitectureError, match="full-attention"):
        sink_cache(tiny_model("mistral"), 4, 8)
    with pytest.raises(InputError):
        sink_cache(_model("llama"), 4, 0)


def _left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _greedy(model, ids, cache, n: int, **kw: Any):
    out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, dim=1)  # (B, n), (B, n, V)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("reassign", [True, False])
def test_left_padded_batch_equals_each_row_alone(impl: str, reassign: bool) -> None:
    """tiny Llama, 2 sinks + window 6 (issue 10.5): every row of a left-padded batch, decoded far past eviction,
    gives the tokens and logits of that prompt run alone -- its sinks are its own first real tokens."""
    model = _model("llama", attn_implementation=impl)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 99, (n,), generator=g).tolist() for n in (5, 11, 2)]
    ids, mask = _left_padded(prompts)
    batch_tokens, batch_logits = _greedy(model, ids, sink_cache(model, 2, 6, reassign=reassign), 24,
                                         attention_mask=mask)
    for row, prompt in enumerate(prompts):
        tokens, logits = _greedy(model, torch.tensor([prompt]), sink_cache(model, 2, 6, reassign=reassign), 24)
        assert batch_tokens[row].tolist() == tokens[0].tolist()
        torch.testing.assert_close(batch_logits[row], logits[0], atol=1e-4, rtol=0)


def test_right_padding_and_short_masks_are_refused() -> None:
    model = _model("llama")
    ids = torch.randint(3, 99, (2, 6))
    with pytest.raises(InputError, match="left padding only"):
        model(ids, attention_mask=torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]]),
              **cache_kwargs(model, sink_cache(model, 2, 6)))
    cache = sink_cache(model, 2, 6)
    model(ids, **cache_kwargs(model, cache))
    with pytest.raises(InputError, match="mask of every token"):
        model(ids[:, :1], attention_mask=torch.ones(2, 1, dtype=torch.long), **cache_kwargs(model, cache))


def test_crop_is_exact_before_eviction_and_refused_after() -> None:
    model = _model("llama")
    ids = torch.randint(3, 99, (1, 14))
    ref, cropped = sink_cache(model, 4, 12), sink_cache(model, 4, 12)
    with torch.no_grad():
        model(ids[:, :10], **cache_kwargs(model, ref))
        model(ids, **cache_kwargs(model, cropped))
        cropped.crop(-4)  # 14 tokens <= 16: nothing evicted yet
        assert cropped.get_seq_length() == 10 and cropped.stored_tokens == 10
        nxt = torch.randint(3, 99, (1, 9))  # past the capacity after the crop
        torch.testing.assert_close(_stream(model, nxt, cropped), _stream(model, nxt, ref), atol=ATOL, rtol=0)
    with pytest.raises(InputError, match="evicted"):
        cropped.crop(-1)


def test_assisted_decoding_works_until_eviction_then_says_why() -> None:
    model, assistant = _model("llama"), _model("llama", num_hidden_layers=1, seed=1)
    prompt = torch.randint(3, 99, (1, 6))

    def run(n: int, **kw: Any) -> torch.Tensor:
        return model.generate(prompt, **cache_kwargs(model, sink_cache(model, 4, 12)), max_new_tokens=n,
                              do_sample=False, pad_token_id=0, **kw)

    assert run(8, assistant_model=assistant).tolist() == run(8).tolist()  # 14 tokens: fits the 16-token cache
    with pytest.raises(InputError, match="assisted/speculative decoding"):
        run(30, assistant_model=assistant)


def test_beam_search_reorders_the_rows() -> None:
    model = _model("llama")
    prompt = torch.randint(3, 99, (1, 6))
    kw: dict[str, Any] = {"num_beams": 3, "num_return_sequences": 2, "do_sample": False, "pad_token_id": 0}
    ours = model.generate(prompt, **cache_kwargs(model, sink_cache(model, 4, 40)), max_new_tokens=10, **kw)
    dense = model.generate(prompt, **cache_kwargs(model, DynamicCache(config=model.config)), max_new_tokens=10, **kw)
    assert ours.tolist() == dense.tolist()  # nothing evicted: the same beams
    cache = sink_cache(model, 2, 5, reassign=True)
    long = model.generate(prompt, **cache_kwargs(model, cache), max_new_tokens=30, **kw)
    assert long.shape == (2, 36) and cache.stored_tokens == 7 and len(cache.layers[0].real) == 3
