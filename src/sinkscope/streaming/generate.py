"""Endless generation with a sink + window cache: chunked prefill, then one token at a time at constant memory.

:func:`stream_generate` is a plain decoding loop over ``model(...)`` with a :class:`SinkWindowCache` as
its KV cache (greedy or temperature / top-k sampling); it yields tokens forever unless ``max_new_tokens`` is set.
The same cache also works with ``model.generate(..., **cache_kwargs(model, cache), prefill_chunk_size=...)``
(`sinkscope.compat.cache_kwargs` picks the keyword the installed transformers takes).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import Cache

from sinkscope.compat import cache_kwargs
from sinkscope.devices import model_device
from sinkscope.errors import InputError
from sinkscope.streaming.cache import kv_cache_bytes, sink_cache


@dataclass(frozen=True)
class GenerateOptions:
    """How `stream_generate` decodes, checked once when built (before any model loads).

    Attributes:
        n_sink: first tokens kept (>= 0); window: most recent tokens kept (>= 1).
        max_new_tokens: stop after this many tokens (>= 0); None: never stop.
        temperature: 0 for greedy decoding, else a finite sampling temperature > 0.
        top_k: sample among the ``top_k`` most likely tokens (>= 1), or None for all.
        prefill_chunk_size: prompt tokens per forward (>= 1).

    Raises:
        InputError: a value outside its range (NaN or infinite temperatures included), naming the option.
    """

    n_sink: int = 4
    window: int = 1020
    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_k: int | None = None
    prefill_chunk_size: int = 512

    def __post_init__(self) -> None:
        checks = [("n_sink", self.n_sink, 0), ("window", self.window, 1), ("max_new_tokens", self.max_new_tokens, 0),
                  ("top_k", self.top_k, 1), ("prefill_chunk_size", self.prefill_chunk_size, 1)]
        for name, value, minimum in checks:
            if value is not None and value < minimum:
                raise InputError(f"{name} must be >= {minimum}, got {value}", param=name)
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InputError(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature}",
                             param="temperature")


def encode_prompt(tokenizer: Any, prompt: str, *, chat: bool = False) -> list[int]:
    """The prompt's token ids, as text (special tokens added) or wrapped in the tokenizer's chat template.

    Raises:
        InputError: an empty prompt, or ``chat`` with a tokenizer that has no chat template.
    """
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError("this tokenizer has no chat template: drop --chat to use the prompt as plain text")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    else:
        ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not ids:
        raise InputError("the prompt has no tokens")
    return ids


@torch.no_grad()
def prefill(model: nn.Module, ids: torch.Tensor, cache: Cache, chunk_size: int = 512) -> torch.Tensor:
    """Run ``ids`` through the model in chunks of ``chunk_size`` tokens, filling ``cache``.

    With a sink cache the cache is evicted after every chunk, so memory stays bounded by
    ``n_sink + window + chunk_size`` tokens of K/V however long the prompt is.

    Shapes: ``ids`` (1, T) -> logits of the last position (1, V).
    """
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise InputError("prefill needs a (1, T) tensor of at least one token")
    if chunk_size < 1:
        raise InputError(f"chunk_size must be >= 1, got {chunk_size}")
    logits = None
    for start in range(0, ids.shape[1], chunk_size):
        out = model(input_ids=ids[:, start:start + chunk_size], use_cache=True, **cache_kwargs(model, cache),
                    logits_to_keep=1)
        logits = out.logits[:, -1]
    assert logits is not None
    return logits


@dataclass(frozen=True)
class StreamToken:
    """One generated token.

    Attributes:
        token_id: the token.
        position: its index in the whole stream (prompt included).
        kv_bytes: bytes held by the cache after the step that produced it.
    """

    token_id: int
    position: int
    kv_bytes: int


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> int:
    """Shapes: logits (V,) -> a token id (greedy when ``temperature == 0``)."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.no_grad()
def stream_generate(model: nn.Module, prompt_ids: list[int] | torch.Tensor, *, n_sink: int = 4, window: int = 1020,
                    reassign: bool = True, max_new_tokens: int | None = None, temperature: float = 0.0,
                    top_k: int | None = None, seed: int = 0, prefill_chunk_size: int = 512,
                    cache: Cache | None = None, stop_ids: set[int] | None = None) -> Iterator[StreamToken]:
    """Generate from a prompt with a sink + window cache (StreamingLLM), yielding tokens as they come.

    Args:
        model: a causal LM (full attention; RoPE for ``reassign``).
        prompt_ids: the prompt's token ids (at least one).
        n_sink: first tokens kept (attention sinks).
        window: most recent tokens kept.
        reassign: re-assign positions by cache slot (StreamingLLM); else keep absolute positions.
        max_new_tokens: stop after this many tokens; ``None`` generates forever (the caller stops iterating).
        temperature: 0 for greedy decoding, else sampling temperature.
        top_k: sample among the ``top_k`` most likely tokens.
        seed: sampling seed.
        prefill_chunk_size: prompt tokens per forward during prefill.
        cache: a cache to use instead of a fresh ``sink_cache(model, n_sink, window, reassign=reassign)``.
        stop_ids: stop after yielding one of these tokens (e.g. EOS); ``None`` never stops on a token.

    Yields:
        :class:`StreamToken` per generated token; ``kv_bytes`` stays constant once the cache is full.
    """
    GenerateOptions(n_sink, window, max_new_tokens, temperature, top_k, prefill_chunk_size)  # checked once, here
    device = model_device(model)
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device).reshape(1, -1)
    if ids.shape[1] == 0:
        raise InputError("the prompt has no tokens")
    cache = cache if cache is not None else sink_cache(model, n_sink, window, reassign=reassign)
    generator = torch.Generator().manual_seed(seed)
    logits = prefill(model, ids, cache, prefill_chunk_size)[0]  # (V,)
    position = ids.shape[1]
    produced = 0
    while max_new_tokens is None or produced < max_new_tokens:
        token = _pick(logits, temperature, top_k, generator)
        nxt = torch.tensor([[token]], device=device)
        logits = model(input_ids=nxt, use_cache=True, **cache_kwargs(model, cache)).logits[0, -1]
        yield StreamToken(token, position, kv_cache_bytes(cache))
        position += 1
        produced += 1
        if stop_ids is not None and token in stop_ids:
            return
