"""What a patch does to text (the text half of `repeat evaluate`): KL and perplexity on ordinary text, token 0's
sink ratio (which the patch must leave alone), and the natural-repetition harm documents (`harm`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from sinkscope.devices import model_device
from sinkscope.inputs import pad_batch
from sinkscope.interventions.patch import SinkPatch, apply_patch
from sinkscope.models.adapters import pad_token_id
from sinkscope.profile import profile_sinks


@dataclass
class TextEffect:
    """Side effects on ordinary text (per predicted token, real positions only).

    Attributes:
        kl: mean KL(original || patched) in nats per token.
        ppl_original / ppl_patched: perplexities; ppl_change: relative change (patched / original - 1).
        tokens: how many predicted tokens were compared; clamped: neuron activations the patch replaced.
    """

    kl: float
    kl_max: float
    ppl_original: float
    ppl_patched: float
    ppl_change: float
    tokens: int
    clamped: int


@torch.no_grad()
def text_effect(model: nn.Module, patch: SinkPatch, seqs: Sequence[Sequence[int]], *, batch_size: int = 8,
                inert: bool = False) -> TextEffect:
    """KL(original || patched) per token and perplexity change on ``seqs`` (left-padded batches).

    ``inert``: the caller knows the patch computes exactly the original on ``seqs`` (its gate opens nowhere:
    `sinkscope.repetition.harm.gate_closed_everywhere`); the patched forward is then not run."""
    device = model_device(model)
    pad = pad_token_id(model)
    kl_sum, kl_max, n_tok, nll_o, nll_p, clamped = 0.0, 0.0, 0, 0.0, 0.0, 0
    for s in range(0, len(seqs), batch_size):
        ids, mask = pad_batch(seqs[s:s + batch_size], pad, side="left", device=device)
        lo = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().log_softmax(-1)
        if inert:
            lp = lo
        else:
            with apply_patch(model, patch) as h:
                lp = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().log_softmax(-1)
                clamped += h.n_clamped
        valid = mask.bool()
        kl = (lo.exp() * (lo - lp)).sum(-1).clamp_min(0.0)[valid]  # (n,)
        kl_sum += float(kl.sum())
        kl_max = max(kl_max, float(kl.max()))
        n_tok += int(valid.sum())
        tgt = ids[:, 1:, None]
        pv = valid[:, 1:] & valid[:, :-1]
        nll_o += float(-lo[:, :-1].gather(-1, tgt)[..., 0][pv].sum())
        nll_p += float(-lp[:, :-1].gather(-1, tgt)[..., 0][pv].sum())
    n_pred = sum(len(s) - 1 for s in seqs)
    ppl_o, ppl_p = float(torch.exp(torch.tensor(nll_o / n_pred))), float(torch.exp(torch.tensor(nll_p / n_pred)))
    return TextEffect(kl_sum / max(n_tok, 1), kl_max, ppl_o, ppl_p, ppl_p / ppl_o - 1.0, n_tok, clamped)


def side_effects(model: nn.Module, tokenizer: Any, patches: dict[str, SinkPatch], text_seqs: Sequence[Sequence[int]],
                 harm_sets: dict[str, Sequence[Any]], *, batch_size: int = 8, sink_ratio: bool = True
                 ) -> dict[str, dict[str, Any]]:
    """What each patch does to text: KL / perplexity on ordinary text (``text_seqs``, e.g. held-out WikiText),
    token 0's sink ratio there, and the natural-repetition documents of every harm set (per document and per
    family: `sinkscope.repetition.harm`). Returns ``{patch name: {"text", "sink_ratio_*", "harm": {set: ...}}}``.
    A gated patch whose gate opens nowhere in ``text_seqs`` computes exactly the original there, so its text
    numbers are taken without running it."""
    from sinkscope.repetition.harm import effects_to_json, gate_closed_everywhere, harm_effects, summarise_harm

    out: dict[str, dict[str, Any]] = {}
    seqs = [list(s) for s in text_seqs]
    before = profile_sinks(model, seqs, batch_size=batch_size).sink_ratio(0) if sink_ratio else None
    for name, patch in patches.items():
        inert = all(gate_closed_everywhere(model, patch, s) for s in seqs)
        res: dict[str, Any] = {"text": asdict(text_effect(model, patch, seqs, batch_size=batch_size, inert=inert)),
                               "text_gate_opened": not inert}
        if sink_ratio:
            res["sink_ratio_before"] = before
            if inert:
                res["sink_ratio_after"] = before
            else:
                with apply_patch(model, patch):
                    res["sink_ratio_after"] = profile_sinks(model, seqs, batch_size=batch_size).sink_ratio(0)
        res["harm"] = {}
        out[name] = res
    for set_name, docs in harm_sets.items():
        for name, eff in harm_effects(model, tokenizer, patches, docs).items():
            out[name]["harm"][set_name] = {"families": summarise_harm(eff), "documents": effects_to_json(eff)}
    return out
