"""Evaluate a sink patch: divergence before/after on held-out words, KL and perplexity on ordinary text, and
token 0's sink ratio (which the patch must leave alone)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from sinkscope.interventions.patch import SinkPatch, apply_patch
from sinkscope.models.adapters import get_adapter, pad_token_id
from sinkscope.profile import profile_sinks
from sinkscope.repetition.generate import greedy_continue, left_pad
from sinkscope.tasks.repeated_tokens import build_prompt, detect_divergence
from sinkscope.devices import model_device


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


@dataclass
class PatchEvaluation:
    """Everything `evaluate_patch` measured."""

    rates: list[dict[str, Any]]  # one row per (N): n, words, diverged_before, diverged_after, rates, reduction
    verdicts: list[dict[str, Any]]  # one row per (word, N)
    text: TextEffect
    sink_ratio_before: float
    sink_ratio_after: float
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"rates": self.rates, "text": asdict(self.text), "sink_ratio_before": self.sink_ratio_before,
                "sink_ratio_after": self.sink_ratio_after, "settings": self.settings, "verdicts": self.verdicts}


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
        ids, mask = left_pad(seqs[s:s + batch_size], pad, device)
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


def divergence_verdicts(model: nn.Module, tokenizer: Any, words: Sequence[str], n: int, *, form: str = "instruct",
                        max_new_tokens: int = 24, batch_size: int = 8, on_batch: Callable[[int], None] | None = None
                        ) -> list[dict[str, Any]]:
    """Greedy continuation of each word's prompt with ``n`` copies; one verdict row per word."""
    a = get_adapter(model)
    prompts = [build_prompt(tokenizer, w, n, form, max_positions=a.max_positions, reserve=max_new_tokens)
               for w in words]
    outs = greedy_continue(model, [p.ids for p in prompts], max_new_tokens=max_new_tokens, batch_size=batch_size,
                           on_batch=on_batch)
    rows = []
    for p, o in zip(prompts, outs):
        v = detect_divergence(tokenizer, p.word, o)
        rows.append({"word": p.word, "n": n, "form": form, "diverged": v.diverged, "at": v.at,
                     "emitted": v.emitted[:120], "continuation": tokenizer.decode(o, skip_special_tokens=True)})
    return rows


#: a run counts as first-like when its projection on the patch's first-token direction is this many ordinary
#: spreads (q90 - median) above the ordinary median
FIRST_LIKE_SCORE = 5.0


def _first_like_split(model: nn.Module, tokenizer: Any, patch: SinkPatch, words: Sequence[str], n: int, form: str,
                      rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Adds ``run_score`` to each verdict row (unpatched run, last 32 positions, first direction rule's layer,
    in ordinary spreads) and returns the divergence counts among first-like runs and among the others."""
    from sinkscope.repetition.direction import run_projections

    rule = patch.directions[0]
    directions: list[torch.Tensor | None] = [None] * get_adapter(model).n_layers
    directions[rule.layer] = torch.tensor(rule.direction)
    proj = run_projections(model, tokenizer, directions, words, n, form=form)[:, rule.layer]
    spread = max(rule.threshold - rule.value, 1e-6)
    for r, p in zip(rows, proj.tolist()):
        r["run_score"] = (p - rule.value) / spread
    first_like = [r for r in rows if r["run_score"] >= FIRST_LIKE_SCORE]
    other = [r for r in rows if r["run_score"] < FIRST_LIKE_SCORE]
    return {"first_like_words": len(first_like),
            "first_like_diverged_before": sum(r["diverged_before"] for r in first_like),
            "first_like_diverged_after": sum(r["diverged_after"] for r in first_like),
            "other_diverged_before": sum(r["diverged_before"] for r in other),
            "other_diverged_after": sum(r["diverged_after"] for r in other)}


def evaluate_patch(model: nn.Module, tokenizer: Any, patch: SinkPatch, words: Sequence[str], ns: Sequence[int],
                   text_seqs: Sequence[Sequence[int]], *, form: str = "instruct", max_new_tokens: int = 24,
                   batch_size: int = 8, on_batch: Callable[[int], None] | None = None) -> PatchEvaluation:
    """Divergence rate before/after at every N, KL and perplexity change on ``text_seqs``, token 0's sink ratio.

    ``text_seqs`` should be ordinary text the patch was not calibrated on. The sink ratio (``Sink_0``, eps 0.3)
    is measured on ``text_seqs`` with and without the patch.
    """
    rates, verdicts = [], []
    for n in ns:
        before = divergence_verdicts(model, tokenizer, words, n, form=form, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, on_batch=on_batch)
        with apply_patch(model, patch):
            after = divergence_verdicts(model, tokenizer, words, n, form=form, max_new_tokens=max_new_tokens,
                                        batch_size=batch_size, on_batch=on_batch)
        for b, a in zip(before, after):
            verdicts.append({"word": b["word"], "n": n, "diverged_before": b["diverged"],
                             "diverged_after": a["diverged"], "emitted_before": b["emitted"],
                             "emitted_after": a["emitted"], "continuation_before": b["continuation"],
                             "continuation_after": a["continuation"]})
        rb = sum(r["diverged"] for r in before) / len(before)
        ra = sum(r["diverged"] for r in after) / len(after)
        row = {"n": n, "words": len(words), "rate_before": rb, "rate_after": ra,
               "relative_reduction": (rb - ra) / rb if rb > 0 else float("nan")}
        if patch.directions:
            row.update(_first_like_split(model, tokenizer, patch, words, n, form, verdicts[-len(words):]))
        rates.append(row)
    effect = text_effect(model, patch, text_seqs, batch_size=batch_size)
    seqs = [list(s) for s in text_seqs]
    sr_before = profile_sinks(model, seqs, batch_size=batch_size).sink_ratio(0)
    with apply_patch(model, patch):
        sr_after = profile_sinks(model, seqs, batch_size=batch_size).sink_ratio(0)
    return PatchEvaluation(rates, verdicts, effect, sr_before, sr_after,
                           {"form": form, "max_new_tokens": max_new_tokens, "words": list(words), "ns": list(ns),
                            "text_samples": len(text_seqs), "patch_neurons": patch.n_neurons,
                             "patch": patch.describe(), "first_like_score": FIRST_LIKE_SCORE})


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
