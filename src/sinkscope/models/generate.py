"""Batched greedy continuations of token-id prompts: left padding, KV cache, one row per prompt."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from sinkscope.devices import model_device
from sinkscope.inputs import pad_batch
from sinkscope.models import adapters


@torch.no_grad()
def greedy_continue(model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 24,
                    batch_size: int = 8, pad_token_id: int | None = None, eos_token_id: int | None = None,
                    on_batch: Callable[[int], None] | None = None) -> list[list[int]]:
    """Greedy continuations (``model.generate``, KV cache) of every prompt, batched with left padding.

    Prompts are grouped by length so that batches carry little padding. Returns the new token ids of each
    prompt (in the order given; at most ``max_new_tokens``, cut after EOS). ``on_batch(n_rows)`` is called after
    every batch.
    """
    device = model_device(model)
    pad = adapters.pad_token_id(model, pad_token_id)
    eos = eos_token_id if eos_token_id is not None else getattr(model.generation_config, "eos_token_id", None)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ids, mask = pad_batch([prompts[i] for i in rows], pad, side="left", device=device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=eos, temperature=None, top_p=None, top_k=None)
        new = gen[:, ids.shape[1]:].tolist()
        eos_set = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        for r, seq in zip(rows, new):
            cut = next((j + 1 for j, t in enumerate(seq) if t in eos_set), len(seq))
            out[r] = seq[:cut]
        if on_batch is not None:
            on_batch(len(rows))
    return out

