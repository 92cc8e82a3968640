"""The ways to build a repetition patch, in one registry: `repeat patch --method M` is ``PATCH_METHODS[M]``.

Each method has its own option object (checked on construction, before any model loads) and a builder that
returns a `BuiltPatch` (the patch, how it was chosen, and what to print), which saves itself:

* ``dedup`` (ours, the default): inside a repetition (the embedding-cosine gate), the repeated keys share one
  key's attention, for queries inside the repetition only. No measurement: the model is not needed.
* ``direction``: the first-token direction of the layer where long runs stand out most, clamped back to its
  ordinary median inside repetitions (`sinkscope.repetition.direction`), plus the de-duplication by default.
* ``neurons``: the circuit's first-token neurons that fire on runs, clamped where they exceed their ordinary range
  (from a `repeat circuit` directory, or a circuit run here).
* ``paper`` (alias ``yona``, the name the CLI documented first): Yona et al.'s published patch, the sink layer's
  sink neurons set to their ordinary median at every position but the first (`sink_neurons_paper`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from sinkscope.errors import InputError
from sinkscope.interventions.patch import DEDUP_QUERIES as DEDUP_QUERY_CHOICES
from sinkscope.interventions.patch import NeuronRule, RepetitionGate, SinkPatch, save_patch
from sinkscope.io import write_json_atomic
from sinkscope.progress import ProgressCallback
from sinkscope.registry import Registry
from sinkscope.repetition.words import PATCH_WORDS, run_token_id

#: defaults of the de-duplication: the design chosen on DEV words and the DEV harm set by the rule in
#: experiments/repeat_chain.design.py (docs/repetition.md): repeated keys counted once, only by queries inside the
#: repetition (text after it attends normally)
DEDUP_KEEP = 1
DEDUP_QUERIES = "gated"
DEDUP_REACH = 0


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got {value}", param=name)


def _words(words: tuple[str, ...]) -> None:
    if not words or any(not w or not w.strip() for w in words):
        raise InputError("give at least one non-empty word", param="words")


@dataclass(frozen=True)
class DedupOptions:
    """The repetition gate (``window`` tokens, mean embedding cosine >= ``min_cos``) and the de-duplication
    (`SinkPatch.dedup_keep` / ``dedup_queries`` / ``dedup_reach``)."""

    window: int = 32
    min_cos: float = 0.8
    dedup_keep: int = DEDUP_KEEP
    dedup_queries: str = DEDUP_QUERIES
    dedup_reach: int = DEDUP_REACH

    def __post_init__(self) -> None:
        _positive("window", self.window)
        if not (math.isfinite(self.min_cos) and -1.0 <= self.min_cos <= 1.0):
            raise InputError(f"--min-cos must be in [-1, 1], got {self.min_cos}", param="min_cos")
        if self.dedup_keep < 0 or self.dedup_reach < 0:
            raise InputError("--dedup-keep and --dedup-reach must be >= 0", param="dedup_keep")
        if self.dedup_queries not in DEDUP_QUERY_CHOICES:
            raise InputError(f"--dedup-queries must be one of {', '.join(DEDUP_QUERY_CHOICES)}, got "
                             f"{self.dedup_queries!r}", param="dedup_queries")

    def dedup_fields(self) -> dict[str, Any]:
        return {"dedup_keep": self.dedup_keep, "dedup_queries": self.dedup_queries, "dedup_reach": self.dedup_reach}


@dataclass(frozen=True)
class DirectionOptions(DedupOptions):
    """``words`` whose runs of ``n`` copies are measured; ``layer`` forces the layer; ``dedup`` adds the
    de-duplication; ``corpus``: ordinary text for the directions' ranges (None: the shipped WikiText-2)."""

    words: tuple[str, ...] = PATCH_WORDS[:8]
    n: int = 1024
    layer: int | None = None
    dedup: bool = True
    corpus: str | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        _words(self.words)
        _positive("n", self.n)
        _positive("batch_size", self.batch_size)
        if self.layer is not None and self.layer < 0:
            raise InputError(f"--layer must be >= 0, got {self.layer}", param="layer")


@dataclass(frozen=True)
class NeuronOptions:
    """``circuit``: a `repeat circuit` directory (None: run the circuit on ``words`` x ``n`` copies here);
    neurons above their ordinary range on at least ``fire_min`` of the run positions are kept, with threshold
    ``margin`` x their ordinary maximum."""

    circuit: str | None = None
    words: tuple[str, ...] = PATCH_WORDS[:8]
    n: int = 512
    fire_min: float = 0.2
    margin: float = 1.0
    corpus: str | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        _words(self.words)
        _positive("n", self.n)
        _positive("batch_size", self.batch_size)
        if not (math.isfinite(self.fire_min) and 0.0 <= self.fire_min <= 1.0):
            raise InputError(f"--fire-min is a share of run positions in [0, 1], got {self.fire_min}",
                             param="fire_min")
        if not (math.isfinite(self.margin) and self.margin > 0):
            raise InputError(f"--margin must be a positive number, got {self.margin}", param="margin")


@dataclass(frozen=True)
class PaperOptions:
    """Yona et al.'s rules: ``words`` as one-token probes, the top ``k`` candidates, kept when zeroing them at
    token 0 removes at least ``min_drop`` of the first token's norm peak; ``corpus``: ordinary text for the
    neurons' ordinary value (None: the shipped WikiText-2; the frozen patch of docs/results used
    ``docs/results/repeat_eval_cpu/patches/yona/calibration.txt``, see docs/repetition.md)."""

    words: tuple[str, ...] = PATCH_WORDS
    k: int = 8
    min_drop: float = 0.1
    corpus: str | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        _words(self.words)
        _positive("k", self.k)
        _positive("batch_size", self.batch_size)
        if not (math.isfinite(self.min_drop) and 0.0 <= self.min_drop <= 1.0):
            raise InputError(f"--min-drop must be in [0, 1], got {self.min_drop}", param="min_drop")


@dataclass
class BuiltPatch:
    """A built patch, how it was chosen (``report``, saved as ``<method>_report.json``), the circuit a
    ``neurons`` build ran (saved under ``circuit/``), and the lines that describe it."""

    method: str
    patch: SinkPatch
    report: dict[str, Any] | None = None
    circuit: Any = None
    lines: list[str] = field(default_factory=list)

    def save(self, directory: str | Path) -> Path:
        """The manifest (`save_patch`), the report and the circuit, each written atomically."""
        d = Path(directory)
        if self.circuit is not None:
            self.circuit.save(d / "circuit")
        save_patch(self.patch, d)
        if self.report is not None:
            write_json_atomic(d / f"{self.method}_report.json", self.report)
        return d


#: builder(model or None, tokenizer or None, base model spec, options, progress) -> BuiltPatch
Builder = Callable[[Any, Any, str, Any, "ProgressCallback | None"], BuiltPatch]


@dataclass(frozen=True)
class PatchMethod:
    """One entry of `PATCH_METHODS`: its option type, its builder, and whether it needs the model loaded."""

    name: str
    options: type
    build: Builder
    needs_model: bool
    summary: str

    def make_options(self, given: dict[str, Any]) -> Any:
        """The method's option object from the options given (None = not given); an option the method does not
        take is refused in one line."""
        names = {f.name for f in dataclasses.fields(self.options)}
        extra = sorted(k for k, v in given.items() if v is not None and k not in names)
        if extra:
            flags = ", ".join("--" + k.replace("_", "-") for k in extra)
            raise InputError(f"{flags} does not apply to --method {self.name}")
        return self.options(**{k: v for k, v in given.items() if v is not None and k in names})


PATCH_METHODS: Registry[PatchMethod] = Registry("patch method")
#: other accepted names of a method
ALIASES = {"yona": "paper"}


def patch_method(name: str) -> PatchMethod:
    """The method called ``name`` (or an alias of it); InputError naming the choices otherwise."""
    key = ALIASES.get(name, name)
    if key not in PATCH_METHODS:
        raise InputError(f"unknown --method {name!r}; choose {', '.join(PATCH_METHODS.names())}", param="method")
    return PATCH_METHODS[key]


def _meta(patch: SinkPatch, revision: str | None) -> SinkPatch:
    """``patch`` with the hub revision its base model was measured at (restored by `sinkscope.load_model`)."""
    if revision is None:
        return patch
    return dataclasses.replace(patch, meta={**patch.meta, "base_revision": revision})


def dedup_patch(*, base_model: str, window: int = 32, min_cos: float = 0.8) -> SinkPatch:
    """The attention de-duplication alone: no measurement needed (the gate finds repetitions from embeddings)."""
    return SinkPatch([], base_model, True, {"method": "dedup"}, [], RepetitionGate(window, min_cos), True)


def _build_dedup(model: Any, tokenizer: Any, base_model: str, o: DedupOptions,
                 progress: ProgressCallback | None) -> BuiltPatch:
    p = dataclasses.replace(dedup_patch(base_model=base_model, window=o.window, min_cos=o.min_cos),
                            **o.dedup_fields())
    return BuiltPatch("dedup", p)


def _build_direction(model: nn.Module, tokenizer: Any, base_model: str, o: DirectionOptions,
                     progress: ProgressCallback | None) -> BuiltPatch:
    from sinkscope.repetition.corpus import calibration_sequences, read_corpus
    from sinkscope.repetition.direction import build_direction_patch

    for w in o.words:
        run_token_id(tokenizer, w)
    if progress is not None:
        progress(0, 1, "measure directions and runs")
    p, report = build_direction_patch(model, tokenizer, calibration_sequences(tokenizer, read_corpus(o.corpus)),
                                      list(o.words), base_model=base_model, n=o.n, layer=o.layer, window=o.window,
                                      min_cos=o.min_cos, attention_dedup=o.dedup, batch_size=o.batch_size)
    if o.dedup:
        p = dataclasses.replace(p, **o.dedup_fields())
    if progress is not None:
        progress(1, 1, "measure directions and runs")
    r = p.directions[0]
    lines = [f"  layer scores (runs beyond ordinary text, in ordinary spreads): {[round(x, 1) for x in report.scores]}",
             f"  layer {r.layer}: clamp above {r.threshold:.1f} to {r.value:.1f} (first token "
             f"{report.ordinary['first'][r.layer]:.1f}, runs {p.meta['run_projection_mean']:.1f})"]
    return BuiltPatch("direction", p, dataclasses.asdict(report), lines=lines)


def neuron_patch(circuit: Any, stats: Any, *, base_model: str, fire_min: float = 0.2, margin: float = 1.0,
                 min_effect: float | None = None) -> SinkPatch:
    """Rules for the circuit's first-token neurons that fire above their ordinary range on repeated runs.

    Args:
        circuit: a `sinkscope.repetition.circuit.SinkCircuit` measured with run words.
        stats: the `NeuronStats` the circuit was built from (thresholds = ``margin * other_max``,
            values = ``other_median``).
        fire_min: keep neurons above their range on at least this share of the runs' last positions.
        min_effect: if given, also require this causal effect on token 0's sink.

    Raises:
        InputError: the circuit has no run measurements, or no neuron passes the criteria.
    """
    neurons = [c for c in circuit.components if c.kind == "neuron"]
    if not circuit.runs:
        raise InputError("the circuit has no run measurements (localise it with run words first)")
    chosen = [c for c in neurons if c.fire_run >= fire_min and (min_effect is None or c.effect >= min_effect)]
    if not chosen:
        raise InputError(f"no first-token neuron fires above its ordinary range on >= {fire_min:.0%} of run positions")
    by_layer: dict[int, list[int]] = {}
    for c in chosen:
        by_layer.setdefault(c.layer, []).append(c.index)
    rules = [NeuronRule(l, sorted(ix), [margin * float(stats.other_max[l][j]) for j in sorted(ix)],
                        [float(stats.other_median[l][j]) for j in sorted(ix)]) for l, ix in sorted(by_layer.items())]
    meta = {"fire_min": fire_min, "margin": margin, "min_effect": min_effect,
            "run_words": circuit.settings.get("run_words"), "run_length": circuit.settings.get("run_length"),
            "calibration_positions": stats.n_positions,
            "neurons": [{"layer": c.layer, "index": c.index, "effect": c.effect, "fire_run": c.fire_run}
                        for c in chosen]}
    return SinkPatch(rules, base_model, True, meta)


def _build_neurons(model: nn.Module, tokenizer: Any, base_model: str, o: NeuronOptions,
                   progress: ProgressCallback | None) -> BuiltPatch:
    from sinkscope.repetition.circuit import CircuitOptions, CircuitResult, run_circuit

    ran = None
    if o.circuit is not None:
        found = CircuitResult.load(o.circuit)
    else:
        found = ran = run_circuit(model, tokenizer, CircuitOptions(tuple(o.words), n=o.n, heads=False,
                                                                   batch_size=o.batch_size, corpus=o.corpus),
                                  progress=progress)
    p = neuron_patch(found.circuit, found.stats, base_model=base_model, fire_min=o.fire_min, margin=o.margin)
    lines = [f"  layer {r.layer}: neurons {r.index} thresholds {[round(t, 2) for t in r.threshold]}" for r in p.rules]
    return BuiltPatch("neurons", p, circuit=ran, lines=lines)


def _build_paper(model: nn.Module, tokenizer: Any, base_model: str, o: PaperOptions,
                 progress: ProgressCallback | None) -> BuiltPatch:
    from sinkscope.repetition.corpus import calibration_sequences, read_corpus
    from sinkscope.repetition.sink_neurons_paper import sink_neurons_patch

    p, report = sink_neurons_patch(model, tokenizer, calibration_sequences(tokenizer, read_corpus(o.corpus)),
                                   list(o.words), base_model=base_model, k=o.k, min_drop=o.min_drop,
                                   batch_size=o.batch_size)
    sl = report["sink_layer"]
    lines = [f"  sink layer {sl['layer']} (first {sl['half']} layers: MLP output norm at a one-token input > "
             f"{sl['threshold']:.1f}); m_l = {[round(x, 1) for x in sl['mlp_norm']]}"]
    lines += [f"  L{sl['layer']}.N{n['index']}: score {n['score']:.1f}, |a| at token 0 {n['first_activation']:.1f},"
              f" ablation removes {n['peak_drop']:.1%} of the first token's norm peak{' (kept)' if n['kept'] else ''}"
              for n in report["neurons"]]
    return BuiltPatch("paper", p, report, lines=lines)


PATCH_METHODS.add("dedup", PatchMethod("dedup", DedupOptions, _build_dedup, False,
                                       "ours (default): repeated keys counted once by queries inside a repetition"))
PATCH_METHODS.add("direction", PatchMethod("direction", DirectionOptions, _build_direction, True,
                                           "a gated clamp of the first-token direction (+ the de-duplication)"))
PATCH_METHODS.add("neurons", PatchMethod("neurons", NeuronOptions, _build_neurons, True,
                                         "conditional clamp of the circuit's first-token neurons"))
PATCH_METHODS.add("paper", PatchMethod("paper", PaperOptions, _build_paper, True,
                                       "Yona et al.'s patch: the sink layer's sink neurons, every position but the "
                                       "first (alias: yona)"))
PATCH_METHODS.freeze()


def build_patch(method: str, options: Any, *, base_model: str, model: nn.Module | None = None,
                tokenizer: Any = None, base_revision: str | None = None,
                progress: ProgressCallback | None = None) -> BuiltPatch:
    """Build a patch with the method called ``method`` (see `PATCH_METHODS`) and its option object."""
    m = patch_method(method)
    if not isinstance(options, m.options):
        raise InputError(f"--method {m.name} takes {m.options.__name__}, got {type(options).__name__}")
    if m.needs_model and (model is None or tokenizer is None):
        raise InputError(f"--method {m.name} measures the model: pass the model and its tokenizer")
    built = m.build(model, tokenizer, base_model, options, progress)
    built.patch = _meta(built.patch, base_revision)
    return built
