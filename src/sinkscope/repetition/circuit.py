"""Localise the circuit that makes token 0 a sink, and check which of its parts fire on runs of repeated tokens.

1. Candidates, from measurements only: *first-token neurons* of every layer (MLP neurons whose activation on the
   first token is at least ``ratio`` times their largest activation at any other position of ordinary text,
   ranked by ``|a_0| * ||W_down[:, j]||``, top ``per_layer`` per layer) and every attention head.
2. Causal effect: ablate each candidate at position 0 (zero or mean) on short ordinary text and measure (eager
   attention, exact on these short inputs) how much of token 0's residual peak (mean over layers of
   log(||x_0|| / median ||x_t||)) and of the attention it receives (mean alpha_0 over layers and heads) disappears
   (`sink_effects`: batched variants, each run from its layer's cached input). With more candidates than
   ``exact``, only those with the largest attribution estimate (activation x gradient) are ablated.
3. Firing on runs: share of the last positions of long instructed runs at which each neuron exceeds its ordinary
   range (heads: output norm above the ordinary range), separately for runs whose continuation diverged and
   runs that kept repeating.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sinkscope.capture import forward_hooks
from sinkscope.devices import model_device
from sinkscope.errors import InputError
from sinkscope.interventions.ablate import Component
from sinkscope.io import write_csv_atomic, write_json_atomic
from sinkscope.models.adapters import get_adapter
from sinkscope.models.generate import greedy_continue
from sinkscope.progress import ProgressCallback
from sinkscope.repetition.activations import NeuronStats, few_logits, load_neuron_stats, neuron_stats, save_neuron_stats
from sinkscope.repetition.judge import judge_answer
from sinkscope.repetition.prompts import build_prompt
from sinkscope.repetition.sink_effects import LINEAR_TOL, search_effects
from sinkscope.repetition.words import run_token_id

#: Pruned search: candidates of linear layers ablated exactly, those with the largest attribution estimate (beyond
#: every candidate of a nonlinear layer); with no more candidates than this the search is exhaustive.
DEFAULT_EXACT = 32

#: What each ``progress`` stage of `localise_sink_circuit` does (``stats``: the caller's `neuron_stats`).
CIRCUIT_STAGES = {"stats": "ordinary ranges", "baseline": "unablated pass", "attribution": "attribution (grad x act)",
                  "linearity": "linearity check, layer groups", "ablate": "ablating candidates",
                  "generate": "generating runs", "runs": "reading runs"}


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
    estimate: float = float("nan")  # attribution estimate of ``effect`` (when candidates were pruned)
    exact: bool = True  # False: not ablated (pruned by its estimate); the effects are NaN

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
def _head_stats(model: nn.Module, ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(L, H) mean ||head output|| at token 0 and max at other positions, on equal-length sequences ``ids``."""
    a = get_adapter(model)
    L, H = a.n_layers, a.n_heads
    first, other = np.zeros((L, H)), np.zeros((L, H))

    def grab(l: int, x: torch.Tensor) -> None:
        n = x.detach().float().reshape(x.shape[0], x.shape[1], H, -1).norm(dim=-1)  # (B, T, H)
        first[l] = n[:, 0].mean(0).cpu().numpy()
        other[l] = n[:, 1:].amax(dim=(0, 1)).cpu().numpy()

    with forward_hooks([(a.output_projection(l), (lambda x, l=l: grab(l, x)), True) for l in a.attention_layers]):
        model(input_ids=ids, use_cache=False, **few_logits(model))
    return first, other


@torch.no_grad()
def localise_sink_circuit(
    model: nn.Module, tokenizer: Any, text_seqs: Sequence[Sequence[int]], stats: NeuronStats, *,
    run_words: Sequence[str] = (), run_length: int = 512, form: str = "instruct", mode: str = "zero",
    ratio: float = 1.5, floor: float = 1.0, per_layer: int = 8, heads: bool = True, max_new_tokens: int = 24,
    last_positions: int = 16, batch_size: int = 8, exact: int | None = DEFAULT_EXACT,
    linear_tol: float = LINEAR_TOL, max_rows: int = 96,
    progress: Callable[[str, int, int], None] | None = None,
) -> SinkCircuit:
    """Find, rank and characterise the components that create token 0's sink.

    Args:
        text_seqs: equal-length ordinary-text token sequences (e.g. 8 x 32 tokens) for the ablations.
        stats: `neuron_stats` of the model on ordinary text (defines each neuron's ordinary range).
        run_words: words whose instructed runs of ``run_length`` copies are generated from and measured
            (empty: skip the run measurements).
        mode: ``zero`` or ``mean`` ablation at position 0 (mean: the neuron's ordinary median / the head's mean
            output over the other positions).
        exact: when there are more candidates than this, the search is pruned (`search_effects`): exact
            ablation of every candidate in a layer whose group ablation is not predicted by the attribution
            estimates (activation x gradient) to within ``linear_tol``, and of the ``exact`` others with the
            largest estimate; the rest keep their estimate (``exact=False``, effects NaN) and rank after every
            exactly measured one. None: every candidate is ablated (exhaustive).
        max_rows: batch rows per ablation forward (ablated variants x text sequences).
        progress: ``progress(stage, done, total)``; stages ``baseline``, ``attribution``, ``linearity`` (done =
            layer groups), ``ablate`` (done = candidates ablated), ``generate`` (run prompts continued), ``runs``.

    Returns:
        A `SinkCircuit` whose components are sorted by decreasing causal effect (exact ones first).
    """
    if len({len(s) for s in text_seqs}) != 1:
        raise InputError("circuit localisation needs equal-length text sequences")
    if exact is not None and exact < 1:
        raise InputError(f"exact must be a positive number of candidates (or None: all), got {exact}")
    a = get_adapter(model)
    from sinkscope.profile import model_info

    def report(stage: str, done: int, total: int) -> None:
        if progress is not None:
            progress(stage, done, total)

    if per_layer < 0 or (per_layer == 0 and not heads):
        raise InputError("no candidates to ablate: give --per-layer > 0 or keep --heads", param="per_layer")
    if max_new_tokens < 1 or batch_size < 1 or run_length < 1:
        raise InputError("max_new_tokens, batch_size and run_length must be positive integers")
    ids = torch.tensor([list(s) for s in text_seqs], device=model_device(model))
    neurons = first_token_neurons(model, stats, ratio=ratio, floor=floor, per_layer=per_layer)
    cands = [Component(l, "neuron", j) for l, j, _ in neurons]
    if heads:
        cands += [Component(l, "head", h) for l in a.attention_layers for h in range(a.n_heads)]
    hfirst, hother = _head_stats(model, ids)
    means: dict[Component, Any] = {}
    if mode == "mean":
        hmean = _head_means(model, ids)
        for c in cands:
            means[c] = float(stats.other_median[c.layer][c.index]) if c.kind == "neuron" else hmean[c.layer][c.index]
    found = search_effects(model, ids, cands, exact=exact, linear_tol=linear_tol, mode=mode, means=means or None,
                           max_rows=max_rows, progress=report)
    effects = []
    for c in cands:
        if c.kind == "neuron":
            fa, tr = float(stats.first[c.layer][c.index]), float(stats.other_max[c.layer][c.index])
        else:
            fa, tr = float(hfirst[c.layer, c.index]), float(hother[c.layer, c.index])
        est = max(found.shares(found.estimates[c])) if c in found.estimates else float("nan")
        er, ea = found.shares(found.exact[c]) if c in found.exact else (float("nan"), float("nan"))
        effects.append(ComponentEffect(c.layer, c.kind, c.index, max(er, ea), er, ea, fa, tr, estimate=est,
                                       exact=c in found.exact))
    effects.sort(key=lambda e: (not e.exact, -(e.effect if e.exact else e.estimate)))
    runs = _fire_on_runs(model, tokenizer, effects, run_words, run_length, form, max_new_tokens, last_positions,
                         batch_size, report) if run_words else []
    search = {"search": "exhaustive" if len(found.exact) == len(cands) else "pruned by attribution",
              "exact": exact, "linear_tol": linear_tol, "candidates": len(cands),
              "ablated_exactly": len(found.exact),
              "nonlinear_groups": [f"L{g['layer']} {g['kind']}s" for g in found.groups if not g["linear"]]}
    return SinkCircuit(model_info(model, a), effects,
                       {"log_residual_ratio": found.base.residual, "alpha0": found.base.attention}, runs,
                       {"mode": mode, "ratio": ratio, "floor": floor, "per_layer": per_layer, "heads": heads,
                        "run_words": list(run_words), "run_length": run_length, "form": form,
                        "last_positions": last_positions, "text_samples": len(text_seqs),
                        "text_length": len(text_seqs[0]), **search})


@torch.no_grad()
def _head_means(model: nn.Module, ids: torch.Tensor) -> dict[int, list[torch.Tensor]]:
    a = get_adapter(model)
    out: dict[int, list[torch.Tensor]] = {}

    def grab(l: int, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(x.shape[0], x.shape[1], a.n_heads, -1)[:, 1:].mean(dim=(0, 1))  # (H, D)
        out[l] = list(x)

    with forward_hooks([(a.output_projection(l), (lambda x, l=l: grab(l, x)), True) for l in a.attention_layers]):
        model(input_ids=ids, use_cache=False, **few_logits(model))
    return out


def _run_captures(model: nn.Module, prompts: Sequence[Sequence[int]], layers: Sequence[int], last: int,
                  max_new_tokens: int, batch_size: int, report: Callable[[str, int, int], None]
                  ) -> tuple[list[list[int]], list[dict[tuple[str, int], torch.Tensor]]]:
    """Greedy continuations of ``prompts`` and, from the same generation's prefill pass, the last ``last``
    prompt positions of the MLP activations of ``layers`` and of every attention layer's head outputs.

    Returns (continuations, per prompt {("n", layer): (last, F), ("h", layer): (last, H*D)}).
    """
    a = get_adapter(model)
    calls: list[dict[Any, torch.Tensor]] = []

    def keep(key: Any, x: torch.Tensor) -> None:
        if key == "ids":
            if x.shape[1] > 1:  # a prefill; decoding steps feed one token
                calls.append({"ids": x.detach().cpu()})
        elif calls and x.shape[1] == calls[-1]["ids"].shape[1]:
            calls[-1][key] = x[:, -last:].detach().float().cpu()

    hooks = [(model.get_input_embeddings(), (lambda x: keep("ids", x)), True)]
    hooks += [(a.mlp_down_module(l), (lambda x, l=l: keep(("n", l), x)), True) for l in layers]
    hooks += [(a.output_projection(l), (lambda x, l=l: keep(("h", l), x)), True) for l in a.attention_layers]
    done = [0]

    def on_batch(rows: int) -> None:
        done[0] += rows
        report("generate", done[0], len(prompts))

    report("generate", 0, len(prompts))
    with forward_hooks(hooks):
        outs = greedy_continue(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               on_batch=on_batch)
    found: list[dict[tuple[str, int], torch.Tensor]] = []
    used: set[tuple[int, int]] = set()
    for p in prompts:  # find each prompt's row among the prefill batches (greedy_continue reorders them)
        tail = torch.tensor(list(p))
        hit = next(((i, r) for i, call in enumerate(calls) for r in range(call["ids"].shape[0])
                    if (i, r) not in used and call["ids"].shape[1] >= len(p)
                    and torch.equal(call["ids"][r, -len(p):], tail)), None)
        if hit is None:
            raise RuntimeError("a run prompt's prefill pass was not seen during generation")
        used.add(hit)
        found.append({k: v[hit[1]] for k, v in calls[hit[0]].items() if k != "ids"})
    return outs, found


def _fire_on_runs(model: nn.Module, tokenizer: Any, effects: list[ComponentEffect], words: Sequence[str],
                  n: int, form: str, max_new_tokens: int, last: int, batch_size: int,
                  report: Callable[[str, int, int], None]) -> list[dict[str, Any]]:
    """Fill ``fire_*`` of every component from the last ``last`` run positions of each word's prompt (read from
    the generation's own prefill pass: no second forward over the runs)."""
    a = get_adapter(model)
    prompts = [build_prompt(tokenizer, w, n, form, max_positions=a.max_positions, reserve=max_new_tokens)
               for w in words]
    neuron_layers = sorted({e.layer for e in effects if e.kind == "neuron"})
    outs, got = _run_captures(model, [p.ids for p in prompts], neuron_layers, last, max_new_tokens, batch_size,
                              report)
    verdicts = [judge_answer(tokenizer, p.word, o) for p, o in zip(prompts, outs)]
    fires: dict[tuple[int, str, int], list[float]] = {}
    for i, g in enumerate(got):
        for e in effects:
            if e.kind == "neuron":
                v = g[("n", e.layer)][:, e.index].abs()  # (last,)
            else:
                x = g[("h", e.layer)]
                v = x.reshape(x.shape[0], a.n_heads, -1)[:, e.index].norm(dim=-1)
            fires.setdefault((e.layer, e.kind, e.index), []).append(float((v > e.text_range).float().mean()))
        report("runs", i + 1, len(got))
    div = np.array([v.diverged for v in verdicts])
    for e in effects:
        f = np.array(fires[(e.layer, e.kind, e.index)])
        e.fire_run = float(f.mean())
        e.fire_diverged = float(f[div].mean()) if div.any() else float("nan")
        e.fire_repeating = float(f[~div].mean()) if (~div).any() else float("nan")
    return [{"word": p.word, "n": n, "form": form, "diverged": v.diverged, "at": v.at, "emitted": v.emitted[:80]}
            for p, v in zip(prompts, verdicts)]



#: ordinary-text samples the ablations run on: 8 chunks of 32 tokens, 10 chunks into the corpus
CIRCUIT_TEXT = {"n": 8, "length": 32, "offset": 10}


@dataclass(frozen=True)
class CircuitOptions:
    """Settings of `run_circuit` (`repeat circuit`), checked on construction, before any model loads.

    Attributes:
        words: run words (one token each, checked with the tokenizer later); n: copies in the measured runs.
        corpus: ordinary text (None: the shipped WikiText-2 text); it must hold `CIRCUIT_TEXT`'s samples.
        exact: pruned search size (`localise_sink_circuit`); None: every candidate ablated exactly.
    """

    words: tuple[str, ...]
    n: int = 512
    mode: str = "zero"
    heads: bool = True
    per_layer: int = 8
    max_new_tokens: int = 24
    batch_size: int = 8
    exact: int | None = DEFAULT_EXACT
    corpus: str | None = None

    def __post_init__(self) -> None:
        if not self.words or any(not w.strip() for w in self.words):
            raise InputError("give at least one non-empty run word", param="words")
        if self.mode not in ("zero", "mean"):
            raise InputError(f"--mode must be zero or mean, got {self.mode!r}", param="mode")
        for name in ("n", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}",
                                 param=name)
        if self.per_layer < 0:
            raise InputError(f"--per-layer must be >= 0, got {self.per_layer}", param="per_layer")
        if self.per_layer == 0 and not self.heads:
            raise InputError("nothing to ablate: --per-layer 0 with --no-heads leaves no candidate",
                             param="per_layer")
        if self.exact is not None and self.exact < 1:
            raise InputError(f"--exact must be a positive number of candidates, got {self.exact}", param="exact")


@dataclass
class CircuitResult:
    """A localised circuit and the neuron statistics it was built from (what `repeat circuit` writes)."""

    circuit: SinkCircuit
    stats: NeuronStats

    def save(self, out_dir: str | Path) -> None:
        """``neuron_stats.pt`` (tensors only), ``circuit.json``, ``circuit.csv``, each written atomically."""
        out = Path(out_dir)
        save_neuron_stats(self.stats, out / "neuron_stats.pt")
        write_json_atomic(out / "circuit.json", self.circuit.to_json())
        write_csv_atomic(out / "circuit.csv", self.circuit.rows())

    @classmethod
    def load(cls, directory: str | Path) -> CircuitResult:
        """What `save` wrote. Raises InputError (one line) for a missing, broken or crafted file."""
        d = Path(directory)
        cj = d / "circuit.json"
        if not cj.is_file() or not (d / "neuron_stats.pt").is_file():
            raise InputError(f"{d} has no circuit.json + neuron_stats.pt (run `repeat circuit` first)")
        try:
            circ = SinkCircuit.from_json(json.loads(cj.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{cj} is not a circuit written by `repeat circuit` ({type(e).__name__})") from None
        return cls(circ, load_neuron_stats(d / "neuron_stats.pt"))


def run_circuit(model: nn.Module, tokenizer: Any, options: CircuitOptions, *,
                progress: ProgressCallback | None = None) -> CircuitResult:
    """Neuron statistics on the corpus, then `localise_sink_circuit` on `CIRCUIT_TEXT` samples of it with the
    runs of ``options.words``. ``progress(done, total, stage)`` follows the stages of `CIRCUIT_STAGES`."""
    from sinkscope.repetition.corpus import calibration_sequences, read_corpus, text_chunks

    for w in options.words:
        run_token_id(tokenizer, w)
    text = read_corpus(options.corpus)
    seqs = text_chunks(tokenizer, text, wrap=False, **CIRCUIT_TEXT)

    def stage(name: str, done: int, total: int) -> None:
        if progress is not None:
            progress(done, total, CIRCUIT_STAGES.get(name, name))

    stage("stats", 0, 1)
    stats = neuron_stats(model, calibration_sequences(tokenizer, text), batch_size=options.batch_size)
    stage("stats", 1, 1)
    circ = localise_sink_circuit(model, tokenizer, seqs, stats, run_words=list(options.words),
                                 run_length=options.n, mode=options.mode, heads=options.heads,
                                 per_layer=options.per_layer, max_new_tokens=options.max_new_tokens,
                                 batch_size=options.batch_size, exact=options.exact, progress=stage)
    circ.settings["corpus"] = options.corpus or "shipped WikiText-2"
    return CircuitResult(circ, stats)
