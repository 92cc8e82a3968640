"""Localise the circuit that makes token 0 a sink, and check which of its parts fire on runs of repeated tokens.

1. Candidates, from measurements only: *first-token neurons* of every layer (MLP neurons whose activation on the
   first token is at least ``ratio`` times their largest activation at any other position of ordinary text,
   ranked by ``|a_0| * ||W_down[:, j]||``, top ``per_layer`` per layer) and every attention head.
2. Causal effect: ablate each candidate at position 0 (zero or mean) on short ordinary text and measure (eager
   attention, exact on these short inputs) how much of token 0's residual peak (mean over layers of log(||x_0|| / median ||x_t||)) and of the
   attention it receives (mean alpha_0 over layers and heads) disappears.
3. Firing on runs: share of the last positions of long instructed runs at which each neuron exceeds its ordinary
   range (heads: output norm above the ordinary range), separately for runs whose continuation diverged and
   runs that kept repeating.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from sinkscope.errors import InputError
from sinkscope.interventions.ablate import Component, ablate
from sinkscope.models.adapters import get_adapter, pad_token_id
from sinkscope.repetition.activations import NeuronStats
from sinkscope.repetition.generate import greedy_continue, left_pad
from sinkscope.capture import forward_hooks
from sinkscope.tasks.repeated_tokens import build_prompt, detect_divergence


@dataclass
class ComponentEffect:
    """One candidate and what was measured about it (effects are shares of the baseline, 1 = all removed)."""

    layer: int
    kind: str
    index: int
    effect: float
    effect_residual: float
    effect_attention: float
    first_act: float = float("nan")  # neurons: mean |a| at token 0 on text; heads: ||out|| at token 0
    text_range: float = float("nan")  # neurons: max |a| elsewhere on text; heads: max ||out|| elsewhere
    fire_run: float = float("nan")  # share of run positions above the text range (all runs)
    fire_diverged: float = float("nan")  # ... on runs whose continuation diverged
    fire_repeating: float = float("nan")  # ... on runs that kept repeating

    @property
    def component(self) -> Component:
        return Component(self.layer, self.kind, self.index)


@dataclass
class SinkCircuit:
    """Ranked circuit components plus the baseline and the run measurements."""

    model: dict[str, Any]
    components: list[ComponentEffect]
    baseline: dict[str, float]
    runs: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def top(self, n: int | None = None, kind: str | None = None) -> list[ComponentEffect]:
        c = [x for x in self.components if kind is None or x.kind == kind]
        return c[:n] if n else c

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "baseline": self.baseline, "settings": self.settings, "runs": self.runs,
                "components": [asdict(c) for c in self.components]}

    def rows(self) -> list[dict[str, Any]]:
        return [{"rank": i + 1, **asdict(c)} for i, c in enumerate(self.components)]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SinkCircuit:
        comps = [ComponentEffect(**{k: (float("nan") if v is None else v) for k, v in c.items()})
                 for c in d["components"]]
        return cls(d.get("model", {}), comps, d.get("baseline", {}), d.get("runs", []), d.get("settings", {}))


def first_token_neurons(model: nn.Module, stats: NeuronStats, *, ratio: float = 1.5, floor: float = 1.0,
                        per_layer: int = 8) -> list[tuple[int, int, float]]:
    """(layer, neuron, score) of neurons firing on the first token ``ratio`` x above their ordinary range.

    ``floor`` drops neurons whose first-token activation is tiny in absolute terms; the score is
    ``|a_0| * ||W_down[:, j]||`` (the size of what the neuron writes at token 0).
    """
    a = get_adapter(model)
    out = []
    for l in range(a.n_layers):
        down = a.mlp_down_module(l)
        if down is None or stats.first[l].numel() == 0:
            continue
        w = down.weight.detach().float()  # (d_model, F)
        score = stats.first[l] * w.norm(dim=0).cpu()
        ok = (stats.first[l] >= ratio * stats.other_max[l]) & (stats.first[l] >= floor)
        idx = torch.nonzero(ok).flatten()
        idx = idx[torch.argsort(-score[idx])][:per_layer]
        out += [(l, int(j), float(score[j])) for j in idx]
    return out


@torch.no_grad()
def _sink_measure(model: nn.Module, ids: torch.Tensor) -> tuple[float, float]:
    """(mean over layers of log(||x_l[0]|| / median_t ||x_l[t]||), mean over layers, heads and queries of the
    attention on key 0). ``ids``: (B, T) unpadded; the model must be in eager attention (short inputs only)."""
    out = model(input_ids=ids, output_attentions=True, output_hidden_states=True, use_cache=False)
    hs = torch.stack([h.float().norm(dim=-1) for h in out.hidden_states[1:]])  # (L, B, T)
    ratio = hs[..., 0] / hs[..., 1:].median(dim=-1).values  # (L, B)
    att = torch.stack([a[..., 0].float().mean() for a in out.attentions if a is not None])
    return float(ratio.clamp_min(1e-6).log().mean()), float(att.mean())


@contextlib.contextmanager
def _eager(model: nn.Module) -> Iterator[None]:
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def _head_stats(model: nn.Module, seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(L, H) mean ||head output|| at token 0 and max at other positions, on equal-length sequences."""
    a = get_adapter(model)
    L, H = a.n_layers, a.n_heads
    first, other = np.zeros((L, H)), np.zeros((L, H))

    def grab(l: int, x: torch.Tensor) -> None:
        n = x.detach().float().reshape(x.shape[0], x.shape[1], H, -1).norm(dim=-1)  # (B, T, H)
        first[l] = n[:, 0].mean(0).cpu().numpy()
        other[l] = n[:, 1:].amax(dim=(0, 1)).cpu().numpy()

    with forward_hooks([(a.output_projection(l), (lambda x, l=l: grab(l, x)), True) for l in a.attention_layers]):
        model(input_ids=torch.tensor([list(s) for s in seqs]), use_cache=False)
    return first, other


@torch.no_grad()
def localise_sink_circuit(
    model: nn.Module, tokenizer: Any, text_seqs: Sequence[Sequence[int]], stats: NeuronStats, *,
    run_words: Sequence[str] = (), run_length: int = 512, form: str = "instruct", mode: str = "zero",
    ratio: float = 1.5, floor: float = 1.0, per_layer: int = 8, heads: bool = True, max_new_tokens: int = 24,
    last_positions: int = 16, batch_size: int = 8, progress: Callable[[str, int, int], None] | None = None,
) -> SinkCircuit:
    """Find, rank and characterise the components that create token 0's sink.

    Args:
        text_seqs: equal-length ordinary-text token sequences (e.g. 8 x 32 tokens) for the ablations.
        stats: `neuron_stats` of the model on ordinary text (defines each neuron's ordinary range).
        run_words: words whose instructed runs of ``run_length`` copies are generated from and measured
            (empty: skip the run measurements).
        mode: ``zero`` or ``mean`` ablation at position 0 (mean: the neuron's ordinary median / the head's mean
            output over the other positions).
        progress: ``progress(stage, done, total)``.

    Returns:
        A `SinkCircuit` whose components are sorted by decreasing causal effect.
    """
    if len({len(s) for s in text_seqs}) != 1:
        raise InputError("circuit localisation needs equal-length text sequences")
    a = get_adapter(model)
    from sinkscope.profile import model_info

    ids = torch.tensor([list(s) for s in text_seqs], device=ids_device(model))
    with _eager(model):
        base_res, base_att = _sink_measure(model, ids)
    neurons = first_token_neurons(model, stats, ratio=ratio, floor=floor, per_layer=per_layer)
    cands = [Component(l, "neuron", j) for l, j, _ in neurons]
    if heads:
        cands += [Component(l, "head", h) for l in a.attention_layers for h in range(a.n_heads)]
    hfirst, hother = _head_stats(model, text_seqs)
    means: dict[Component, Any] = {}
    if mode == "mean":
        hmean = _head_means(model, text_seqs)
        for c in cands:
            means[c] = float(stats.other_median[c.layer][c.index]) if c.kind == "neuron" else hmean[c.layer][c.index]
    effects = []
    for i, c in enumerate(cands):
        with ablate(model, [c], positions="first", mode=mode, means=means or None), _eager(model):
            res, att = _sink_measure(model, ids)
        er = (base_res - res) / max(abs(base_res), 1e-9)
        ea = (base_att - att) / max(abs(base_att), 1e-9)
        if c.kind == "neuron":
            fa, tr = float(stats.first[c.layer][c.index]), float(stats.other_max[c.layer][c.index])
        else:
            fa, tr = float(hfirst[c.layer, c.index]), float(hother[c.layer, c.index])
        effects.append(ComponentEffect(c.layer, c.kind, c.index, max(er, ea), er, ea, fa, tr))
        if progress is not None:
            progress("ablate", i + 1, len(cands))
    effects.sort(key=lambda e: -e.effect)
    runs = _fire_on_runs(model, tokenizer, effects, run_words, run_length, form, max_new_tokens, last_positions,
                         batch_size, progress) if run_words else []
    return SinkCircuit(model_info(model, a), effects, {"log_residual_ratio": base_res, "alpha0": base_att}, runs,
                       {"mode": mode, "ratio": ratio, "floor": floor, "per_layer": per_layer, "heads": heads,
                        "run_words": list(run_words), "run_length": run_length, "form": form,
                        "last_positions": last_positions, "text_samples": len(text_seqs),
                        "text_length": len(text_seqs[0])})


@torch.no_grad()
def _head_means(model: nn.Module, seqs: Sequence[Sequence[int]]) -> dict[int, list[torch.Tensor]]:
    a = get_adapter(model)
    out: dict[int, list[torch.Tensor]] = {}

    def grab(l: int, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(x.shape[0], x.shape[1], a.n_heads, -1)[:, 1:].mean(dim=(0, 1))  # (H, D)
        out[l] = list(x)

    with forward_hooks([(a.output_projection(l), (lambda x, l=l: grab(l, x)), True) for l in a.attention_layers]):
        model(input_ids=torch.tensor([list(s) for s in seqs]), use_cache=False)
    return out


def _fire_on_runs(model: nn.Module, tokenizer: Any, effects: list[ComponentEffect], words: Sequence[str],
                  n: int, form: str, max_new_tokens: int, last: int, batch_size: int,
                  progress: Callable[[str, int, int], None] | None) -> list[dict[str, Any]]:
    """Fill ``fire_*`` of every component from the last ``last`` run positions of each word's prompt."""
    a = get_adapter(model)
    prompts = [build_prompt(tokenizer, w, n, form, max_positions=a.max_positions, reserve=max_new_tokens)
               for w in words]
    outs = greedy_continue(model, [p.ids for p in prompts], max_new_tokens=max_new_tokens, batch_size=batch_size)
    verdicts = [detect_divergence(tokenizer, p.word, o) for p, o in zip(prompts, outs)]
    neuron_layers = sorted({e.layer for e in effects if e.kind == "neuron"})
    fires: dict[tuple[int, str, int], list[float]] = {}
    pad = pad_token_id(model)
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        ids, mask = left_pad([p.ids for p in chunk], pad, ids_device(model))
        got: dict[tuple[str, int], torch.Tensor] = {}
        hooks = [(a.mlp_down_module(l), (lambda x, l=l: got.__setitem__(("n", l), x[:, -last:].detach().float())),
                  True) for l in neuron_layers]
        hooks += [(a.output_projection(l), (lambda x, l=l: got.__setitem__(("h", l), x[:, -last:].detach().float())),
                   True) for l in a.attention_layers]
        with forward_hooks(hooks):
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        for e in effects:
            if e.kind == "neuron":
                v = got[("n", e.layer)][..., e.index].abs()  # (B, last)
            else:
                x = got[("h", e.layer)]
                v = x.reshape(x.shape[0], x.shape[1], a.n_heads, -1)[:, :, e.index].norm(dim=-1)
            fires.setdefault((e.layer, e.kind, e.index), []).extend((v > e.text_range).float().mean(1).tolist())
        if progress is not None:
            progress("runs", min(s + batch_size, len(prompts)), len(prompts))
    div = np.array([v.diverged for v in verdicts])
    for e in effects:
        f = np.array(fires[(e.layer, e.kind, e.index)])
        e.fire_run = float(f.mean())
        e.fire_diverged = float(f[div].mean()) if div.any() else float("nan")
        e.fire_repeating = float(f[~div].mean()) if (~div).any() else float("nan")
    return [{"word": p.word, "n": n, "form": form, "diverged": v.diverged, "at": v.at, "emitted": v.emitted[:80]}
            for p, v in zip(prompts, verdicts)]


def ids_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
