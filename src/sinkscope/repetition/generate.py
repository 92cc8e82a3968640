"""Batched greedy continuations of token-id prompts: left padding, KV cache, one row per prompt."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Left-pad id lists: returns ``ids`` (B, T) and ``attention_mask`` (B, T) (1 = real token).

    Each row's first real token sits at ``T - len(row)``.
    """
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, T - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, T - len(s):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def greedy_continue(model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 24,
                    batch_size: int = 8, pad_token_id: int | None = None, eos_token_id: int | None = None,
                    on_batch: Callable[[int], None] | None = None) -> list[list[int]]:
    """Greedy continuations (``model.generate``, KV cache) of every prompt, batched with left padding.

    Prompts are grouped by length so that batches carry little padding. Returns the new token ids of each
    prompt (in the order given; at most ``max_new_tokens``, cut after EOS). ``on_batch(n_rows)`` is called after
    every batch.
    """
    device = next(model.parameters()).device
    cfg = model.config
    pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else 0)
    eos = eos_token_id if eos_token_id is not None else getattr(model.generation_config, "eos_token_id", None)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ids, mask = left_pad([prompts[i] for i in rows], pad, device)
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
