"""The first-token direction of each layer, how far repeated runs move along it, and the patch built from it.

The first-token direction of layer ``l`` is ``u_l = normalise(mean x_l[first] - mean x_l[other])`` over ordinary
text, where ``x_l`` is the residual stream after decoder layer ``l`` (B, T, d_model). The projection ``x_l . u_l``
of a position says how "first-like" it is. On ordinary text it is small except at the first token (and at a few
secondary sinks such as delimiters); in a long run of one repeated token the run's positions drift up along it,
which is the early stage of the sink circuit firing where it should not (RESEARCH.md §3).

`build_direction_patch` measures the directions and the ordinary range of the projection, measures how far the
last positions of long instructed runs go, picks the earliest layer where runs stand out most, and returns a
`SinkPatch` that clamps that projection back to its ordinary median only inside repetitions (a `RepetitionGate`),
and (by default) lets the keys inside a repetition share one key's attention, so that the run, which has become
a collective sink, cannot drown the instruction (`SinkPatch.attention_dedup`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sinkscope.capture import forward_hooks
from sinkscope.devices import model_device
from sinkscope.errors import InputError
from sinkscope.inputs import first_and_other, pad_batch
from sinkscope.interventions.patch import DirectionRule, RepetitionGate, SinkPatch
from sinkscope.models.adapters import get_adapter, pad_token_id
from sinkscope.repetition.prompts import build_prompt


@torch.no_grad()
def _layer_outputs(model: nn.Module, seqs: Sequence[Sequence[int]], batch_size: int,
                   each: Callable[[int, Tensor, Tensor, Tensor], None]) -> None:
    """Run ``seqs`` (left-padded batches) and call ``each(layer, x (B, T, d), real (B, T), first (B, T))``."""
    a = get_adapter(model)
    device = model_device(model)
    pad = pad_token_id(model)
    for s in range(0, len(seqs), batch_size):
        ids, mask = pad_batch(seqs[s:s + batch_size], pad, side="left", device=device)
        first, _ = first_and_other(mask)
        got: dict[int, Tensor] = {}
        hooks = [(m, (lambda x, l=l, got=got: got.__setitem__(l, x.detach().float())), False)
                 for l, m in enumerate(a.layer_modules)]
        with forward_hooks(hooks):
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        for l in range(a.n_layers):
            each(l, got[l], mask.bool(), first)


@dataclass
class FirstTokenDirections:
    """Per layer (lists indexed by layer): the unit direction (d_model,) and its projection on ordinary text.

    Attributes:
        direction: ``u_l``.
        first: median projection of first tokens.
        median / q90 / max: of the projection over the other positions (its ordinary range).
        n_positions: how many other positions were seen.
    """

    direction: list[Tensor]
    first: list[float]
    median: list[float]
    q90: list[float]
    max: list[float]
    n_positions: int


@torch.no_grad()
def first_token_directions(model: nn.Module, seqs: Sequence[Sequence[int]], *, batch_size: int = 8
                           ) -> FirstTokenDirections:
    """Measure ``u_l`` and the ordinary range of ``x_l . u_l`` on ``seqs`` (two passes: means, then projections)."""
    if not seqs:
        raise InputError("need at least one sequence of ordinary text")
    a = get_adapter(model)
    L = a.n_layers
    sum_first = [torch.zeros(a.d_model, dtype=torch.float64) for _ in range(L)]
    sum_other = [torch.zeros(a.d_model, dtype=torch.float64) for _ in range(L)]
    count = {"first": 0, "other": 0}

    def means(l: int, x: Tensor, real: Tensor, first: Tensor) -> None:
        other = real & ~first
        sum_first[l] += x[first].double().sum(0).cpu()
        sum_other[l] += x[other].double().sum(0).cpu()
        if l == 0:
            count["first"] += int(first.sum())
            count["other"] += int(other.sum())

    _layer_outputs(model, seqs, batch_size, means)
    if count["other"] == 0:
        raise InputError("ordinary text needs sequences of at least 2 tokens")
    dirs = []
    for l in range(L):
        d = (sum_first[l] / count["first"] - sum_other[l] / count["other"]).float()
        dirs.append(d / d.norm().clamp_min(1e-12))
    proj_first: list[list[Tensor]] = [[] for _ in range(L)]
    proj_other: list[list[Tensor]] = [[] for _ in range(L)]

    def projections(l: int, x: Tensor, real: Tensor, first: Tensor) -> None:
        p = (x @ dirs[l].to(x.device)).cpu()
        proj_first[l].append(p[first.cpu()])
        proj_other[l].append(p[(real & ~first).cpu()])

    _layer_outputs(model, seqs, batch_size, projections)
    other = [torch.cat(p) for p in proj_other]
    return FirstTokenDirections(dirs, [float(torch.cat(p).median()) for p in proj_first],
                                [float(p.median()) for p in other], [float(p.quantile(0.9)) for p in other],
                                [float(p.max()) for p in other], count["other"])


@torch.no_grad()
def run_projections(model: nn.Module, tokenizer: Any, directions: Sequence[Tensor | None], words: Sequence[str],
                    n: int, *, form: str = "instruct", tail: int = 32, batch_size: int = 4) -> Tensor:
    """Mean projection ``x_l . u_l`` over the last ``tail`` positions of each word's ``n``-copy run: (words, L).

    ``directions[l]`` is ``u_l`` (d_model,), or None to skip layer ``l`` (its column is NaN).
    """
    if not words:
        raise InputError("need at least one run word")
    a = get_adapter(model)
    prompts = [build_prompt(tokenizer, w, n, form, max_positions=a.max_positions).ids for w in words]
    out = torch.full((len(words), a.n_layers), float("nan"))
    k = min(tail, n)
    row = {"start": 0}

    def each(l: int, x: Tensor, real: Tensor, first: Tensor) -> None:
        u = directions[l]
        if u is None:
            return
        p = (x[:, -k:] @ u.to(x.device)).mean(-1).cpu()  # runs end every row: no padding at the end
        out[row["start"]:row["start"] + len(p), l] = p

    for s in range(0, len(prompts), batch_size):
        row["start"] = s
        _layer_outputs(model, prompts[s:s + batch_size], batch_size, each)
    return out


def layer_scores(dirs: FirstTokenDirections, run_proj: Tensor) -> list[float]:
    """Per layer: (mean run projection - ordinary median) / (ordinary q90 - ordinary median), i.e. how far the
    runs go beyond ordinary text in units of its spread."""
    mean_run = run_proj.mean(0)
    return [float((mean_run[l] - dirs.median[l]) / max(dirs.q90[l] - dirs.median[l], 1e-6))
            for l in range(len(dirs.direction))]


def choose_layer(dirs: FirstTokenDirections, run_proj: Tensor, *, tolerance: float = 0.9) -> tuple[int, list[float]]:
    """The earliest layer whose `layer_scores` entry is at least ``tolerance`` x the best layer's.

    Returns (layer, scores per layer). Raises InputError when no layer's runs go beyond the ordinary q90.
    """
    scores = layer_scores(dirs, run_proj)
    best = max(scores)
    if best <= 1.0:
        raise InputError("runs do not move along the first-token direction beyond the ordinary range in any layer "
                         f"(best score {best:.2f}); try longer runs (--n)")
    return next(l for l, s in enumerate(scores) if s >= tolerance * best), scores


@dataclass
class DirectionPatchReport:
    """How `build_direction_patch` chose its rule (for circuit.json / the docs)."""

    layer: int
    scores: list[float]
    run_projection: list[list[float]]  # (words, L)
    words: list[str]
    ordinary: dict[str, list[float]] = field(default_factory=dict)


def build_direction_patch(model: nn.Module, tokenizer: Any, calibration: Sequence[Sequence[int]],
                          words: Sequence[str], *, base_model: str, n: int = 1024, layer: int | None = None,
                          window: int = 32, min_cos: float = 0.8, attention_dedup: bool = True, batch_size: int = 8
                          ) -> tuple[SinkPatch, DirectionPatchReport]:
    """Measure the first-token directions on ``calibration`` (ordinary text), the runs of ``words`` at ``n``
    copies, and return a patch that clamps the chosen layer's first-token projection to its ordinary median where
    it exceeds its ordinary q90, inside repetitions only (``window`` / ``min_cos``: the `RepetitionGate`).

    Args:
        layer: force the layer (default: `choose_layer`).
        attention_dedup: also let the keys inside a repetition share one key's attention
            (`SinkPatch.attention_dedup`), so that the run cannot swamp the rest of the context.
    """
    dirs = first_token_directions(model, calibration, batch_size=batch_size)
    run_proj = run_projections(model, tokenizer, dirs.direction, words, n, batch_size=max(1, batch_size // 2))
    if layer is None:
        chosen, scores = choose_layer(dirs, run_proj)
    else:
        if not 0 <= layer < len(dirs.direction):
            raise InputError(f"layer {layer} out of range 0..{len(dirs.direction) - 1}")
        chosen, scores = layer, layer_scores(dirs, run_proj)
    rule = DirectionRule(chosen, [float(v) for v in dirs.direction[chosen]], dirs.q90[chosen], dirs.median[chosen])
    report = DirectionPatchReport(chosen, scores, run_proj.tolist(), list(words),
                                  {"first": dirs.first, "median": dirs.median, "q90": dirs.q90, "max": dirs.max})
    meta = {"method": "direction", "layer": chosen, "run_words": list(words), "run_length": n,
            "layer_scores": [round(s, 3) for s in scores], "calibration_positions": dirs.n_positions,
            "first_projection": dirs.first[chosen], "ordinary_median": dirs.median[chosen],
            "ordinary_q90": dirs.q90[chosen], "ordinary_max": dirs.max[chosen],
            "run_projection_mean": float(run_proj[:, chosen].mean())}
    return SinkPatch([], base_model, True, meta, [rule], RepetitionGate(window, min_cos), attention_dedup), report
