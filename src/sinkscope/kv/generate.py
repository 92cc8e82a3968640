"""Greedy generation with the head-wise KV cache (the library entry behind ``sinkscope kv generate``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sinkscope.compat import cache_kwargs
from sinkscope.devices import model_device
from sinkscope.kv.cache import headwise_cache
from sinkscope.kv.policy import KVPolicy


@dataclass(frozen=True)
class PolicyGeneration:
    """One greedy continuation under a policy: the new text and ids, and the cache's bytes at the end.

    Attributes:
        text: the decoded new tokens.
        new_ids: their ids.
        prompt_tokens: tokens of the prompt.
        stored_bytes: bytes the head-wise cache held after the last token.
        dense_bytes: bytes a dense cache of the same tokens would hold.
    """

    text: str
    new_ids: list[int]
    prompt_tokens: int
    stored_bytes: int
    dense_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "new_ids": self.new_ids, "prompt_tokens": self.prompt_tokens,
                "stored_bytes": self.stored_bytes, "dense_bytes": self.dense_bytes,
                "bytes_fraction": self.stored_bytes / self.dense_bytes if self.dense_bytes else None}


@torch.no_grad()
def generate_with_policy(model: nn.Module, tokenizer: Any, policy: KVPolicy, prompt: str, *,
                         max_new_tokens: int = 64, prefill_chunk: int | None = None) -> PolicyGeneration:
    """Greedy ``model.generate`` from ``prompt`` with a `headwise_cache` following ``policy``.

    ``prefill_chunk``: feed the prompt in chunks of this many tokens first (exact, bounds the transient attention).
    """
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model_device(model))
    cache = headwise_cache(model, policy)
    if prefill_chunk and ids.shape[1] > prefill_chunk:
        for start in range(0, ids.shape[1] - 1, prefill_chunk):
            end = min(start + prefill_chunk, ids.shape[1] - 1)
            model(input_ids=ids[:, start:end], use_cache=True, **cache_kwargs(model, cache))
    eos = getattr(model.generation_config, "eos_token_id", None)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, temperature=None, top_p=None, top_k=None, eos_token_id=eos,
                         pad_token_id=getattr(model.config, "pad_token_id", None) or eos,
                         **cache_kwargs(model, cache))
    new = out[0, ids.shape[1]:].tolist()
    return PolicyGeneration(tokenizer.decode(new, skip_special_tokens=True), new, int(ids.shape[1]),
                            cache.stored_bytes(), cache.dense_bytes())
