"""The sections of `sinkscope report`: each function measures one aspect of the model and fills a `Section`
(text, figures, tables, the numbers as JSON, a "what this means" box written from those numbers).

Sections share one `ReportContext`, which profiles each input kind once (`SinkProfile` cache). A section gets
``progress(done, total)`` (a `sinkscope.progress.ProgressCallback`, ``what`` optional) to show how far it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from torch import nn

from sinkscope.analyses.dormant import DormancyReport, dormancy_from_profiles
from sinkscope.domains import domain_batch
from sinkscope.errors import InputError
from sinkscope.metrics.sink import check_count, check_eps
from sinkscope.models.adapters import ModelAdapter, get_adapter
from sinkscope.profile import SinkProfile, model_info, profile_sinks
from sinkscope.progress import ProgressCallback
from sinkscope.registry import Registry
from sinkscope.report import explain
from sinkscope.report.html import Section
from sinkscope.versions import versions

Progress = ProgressCallback


@dataclass(frozen=True)
class ReportOptions:
    """Sizes of the report's measurements (defaults fit the 5-minute budget on 2 CPU cores for SmolLM2).

    Attributes:
        n_tokens, samples: tokens per sample and samples per input kind.
        eps: sink threshold of ``Sink_k^eps``.
        batch_size: samples per forward pass.
        sink_kinds: input kinds compared in the sink and norm sections.
        domains: domains compared in the active/dormant section.
        dormant_threshold: alpha_0 at or above which a head is dormant on a domain.
        repeat_words, repeat_lengths, repeat_new_tokens: the repetition section's word list, run lengths and
            generated tokens per prompt.
        circuit_per_layer: first-token neurons per layer tried when localising the sink circuit (0: skip).
        harm_documents: natural-repetition documents (of those where the patch's gate opens) on which the
            repetition section measures the shipped patch's harm (0: none).
        kv_length: tokens per calibration piece of the KV heads section (its budgets refer to this length).
        seed: seed of the random-token inputs.
    """

    n_tokens: int = 64
    samples: int = 8
    eps: float = 0.3
    batch_size: int = 8
    sink_kinds: tuple[str, ...] = ("text", "random", "repeat")
    domains: tuple[str, ...] = ("text", "code", "random")
    dormant_threshold: float = 0.5
    repeat_words: tuple[str, ...] = ("poem", "company", "book", "water", "music", "king")
    repeat_lengths: tuple[int, ...] = (32, 256, 512)
    repeat_new_tokens: int = 12
    circuit_per_layer: int = 1
    harm_documents: int = 6
    kv_length: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        """The one check of the report's options (InputError naming the option), before any model loads."""
        check_eps(self.eps)
        if check_count(self.n_tokens, param="n_tokens") < 8:
            raise InputError(f"n_tokens must be at least 8, got {self.n_tokens}", param="n_tokens")
        if not 1 <= check_count(self.samples, param="samples") <= 8:
            raise InputError(f"samples must be between 1 and 8, got {self.samples}", param="samples")
        check_count(self.batch_size, param="batch_size", minimum=1)
        check_count(self.repeat_new_tokens, param="repeat_new_tokens", minimum=1)
        check_count(self.circuit_per_layer, param="circuit_per_layer")
        check_count(self.harm_documents, param="harm_documents")
        if check_count(self.kv_length, param="kv_length") < 16:
            raise InputError(f"kv_length must be at least 16 tokens, got {self.kv_length}", param="kv_length")
        if not self.repeat_words or any(not w.strip() for w in self.repeat_words):
            raise InputError("repeat_words: give at least one word", param="repeat_words")
        if not self.repeat_lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                                          for n in self.repeat_lengths):
            raise InputError(f"repeat_lengths must be positive integers, got {self.repeat_lengths!r}",
                             param="repeat_lengths")


@dataclass
class ReportContext:
    """What all sections share: the model, its tokenizer, options and the profile cache."""

    model: nn.Module
    tokenizer: Any
    options: ReportOptions = field(default_factory=ReportOptions)
    model_spec: str = ""
    load_s: float | None = None
    profiles: dict[str, SinkProfile] = field(default_factory=dict)
    dormancy: DormancyReport | None = None

    @cached_property
    def adapter(self) -> ModelAdapter:
        """The model's adapter, resolved once for the whole report."""
        return get_adapter(self.model)

    def get_profiles(self, kinds: tuple[str, ...], progress: Progress | None = None) -> dict[str, SinkProfile]:
        """Profiles of the built-in input kinds, computed once each (progress counts attention layers)."""
        o = self.options
        La = len(self.adapter.attention_layers)
        per = -(-o.samples // o.batch_size) * La
        todo = [k for k in kinds if k not in self.profiles]
        total = max(1, per * len(todo))
        for i, kind in enumerate(todo):
            batch = domain_batch(self.tokenizer, kind, n_tokens=o.n_tokens, samples=o.samples, seed=o.seed)
            cb = (lambda d, _t, _w="", s=i * per: progress(s + d, total)) if progress is not None else None
            self.profiles[kind] = profile_sinks(self.model, batch, eps=o.eps, batch_size=o.batch_size, progress=cb,
                                                adapter=self.adapter)
        if progress is not None and not todo:  # all cached: done at once (otherwise the last layer said so)
            progress(total, total)
        return {k: self.profiles[k] for k in kinds}


SectionFn = Callable[[ReportContext, Section, Progress], None]
SECTIONS: Registry[tuple[str, SectionFn]] = Registry("report section")


def section(key: str, title: str) -> Callable[[SectionFn], SectionFn]:
    def deco(fn: SectionFn) -> SectionFn:
        SECTIONS.add(key, (title, fn))
        return fn

    return deco


# ---- 1. model card ---------------------------------------------------------------------------------------------
@section("model", "Model card")
def model_card(ctx: ReportContext, sec: Section, progress: Progress) -> None:
    """Architecture, positions, context, provenance, versions (the timings are added by the builder)."""
    a = ctx.adapter
    info = model_info(ctx.model, a)
    tok = ctx.tokenizer
    bos_added = bool(tok("", add_special_tokens=True)["input_ids"]) and getattr(tok, "bos_token_id", None) is not None
    windows = sorted({w for w in (a.sliding_window(l) for l in a.attention_layers) if w})
    src = info.get("source", {})
    card = {**{k: info[k] for k in ("model_type", "n_layers", "n_heads", "n_kv_heads", "d_model", "d_head",
                                    "positions", "max_positions", "learned_sinks", "output_gate", "n_params")},
            "gqa_group": info["n_heads"] // max(1, info["n_kv_heads"]), "sliding_windows": windows,
            "dtype": str(next(ctx.model.parameters()).dtype).replace("torch.", ""), "bos_added": bos_added,
            "bos_token": getattr(tok, "bos_token", None), "vocab_size": len(tok),
            "source": src, "versions": versions()}
    sec.data["card"] = card
    rows = [
        {"field": "model", "value": ctx.model_spec or src.get("spec") or info.get("name")},
        {"field": "architecture", "value": f"{card['model_type']} ({card['n_params'] / 1e6:.1f}M parameters)"},
        {"field": "layers x heads", "value": f"{card['n_layers']} x {card['n_heads']} (d_head {card['d_head']}, "
                                             f"d_model {card['d_model']})"},
        {"field": "key/value heads (GQA)", "value": f"{card['n_kv_heads']} ({card['gqa_group']} query heads each)"},
        {"field": "positions", "value": card["positions"]},
        {"field": "context", "value": f"{card['max_positions']} tokens"
                                      + (f", sliding windows {windows}" if windows else "")},
        {"field": "learned sinks / output gate", "value": f"{card['learned_sinks']} / {card['output_gate']}"},
        {"field": "BOS added by tokenizer", "value": f"{bos_added} (BOS token {card['bos_token']!r})"},
        {"field": "weights", "value": f"{src.get('kind', '?')}: {src.get('path') or src.get('spec') or '?'}"},
        {"field": "weights sha256", "value": src.get("sha256") or "\u2013"},
        {"field": "dtype", "value": card["dtype"]},
        {"field": "versions", "value": ", ".join(f"{k} {v}" for k, v in card["versions"].items())},
    ]
    if ctx.load_s is not None:
        rows.append({"field": "model load time", "value": f"{ctx.load_s:.1f} s"})
    sec.table(rows, sortable=False, caption="Model")
    for p in explain.explain_model(card):
        sec.explain(p)
    progress(1, 1)


# ---- 2. attention sinks ----------------------------------------------------------------------------------------
def _formation_layer(p: SinkProfile) -> int | None:
    share = p.head_is_sink(0)[p.lengths > 0].mean(axis=(0, 2))
    idx = np.nonzero(share >= 0.5)[0]
    return int(p.attention_layers[idx[0]]) if len(idx) else None


@section("sinks", "Attention sinks")
def sinks(ctx: ReportContext, sec: Section, progress: Progress) -> None:
    """Sink_k^eps for token 0 and the other top positions per input kind, heatmaps, formation layers."""
    from sinkscope.viz import plots, report_plots

    o = ctx.options
    profs = ctx.get_profiles(o.sink_kinds, progress)
    sec.text(f"Per head, alpha_k is the mean attention that key position k receives from the queries that see it "
             f"(Gu et al. 2410.10781); Sink_k^{o.eps} is the share of all heads with alpha_k > {o.eps}. Inputs: "
             f"{o.samples} samples of {o.n_tokens} tokens per kind (built-in English prose, uniformly random tokens, "
             "one word repeated).")
    kinds, rows = {}, []
    for kind, p in profs.items():
        top = p.top_sinks(6)
        other = next((t for t in top if t["position"] != 0), None)
        kinds[kind] = {"sink0": p.sink_ratio(0), "top_sinks": top, "top_other": other,
                       "formation_layer": _formation_layer(p), "bos_prepended": bool(p.inputs.get("bos_prepended")),
                       "sink_ratio_first_by_layer": p.head_is_sink(0)[p.lengths > 0].mean(axis=(0, 2)).tolist(),
                       "layers": list(p.attention_layers)}
        rows.append({"input": kind, "Sink_0": kinds[kind]["sink0"],
                     "2nd position": other["position"] if other else None,
                     "its Sink_k": other["sink_ratio"] if other else None,
                     "top positions": " ".join(f"{t['position']}:{t['sink_ratio']:.2f}" for t in top),
                     "sink forms at layer": kinds[kind]["formation_layer"],
                     "BOS prepended": kinds[kind]["bos_prepended"]})
    sec.data.update({"eps": o.eps, "kinds": kinds})
    sec.table(rows, caption=f"Sink_k^{o.eps} by input kind", csv="sinks_by_input.csv")
    sec.figure(report_plots.sinks_by_kind(profs), "Left: Sink_k for the first key positions. Right: share of heads "
               "per layer that sink on token 0.")
    sec.figure(report_plots.alpha0_heatmaps(profs), "alpha_0 per layer x head for each input kind.")
    first = next(iter(profs.values()))
    sec.figure(plots.attention_on_first_by_layer(first), f"Attention on token 0 by layer ({first.inputs['kind']}).")
    sec.tables["heads_text.csv"] = first.heads_rows()
    for p in explain.explain_sinks(sec.data):
        sec.explain(p)


# ---- 3. value drains, residual peaks, massive activations ------------------------------------------------------
def _norms_of(p: SinkProfile, layer: int) -> dict[str, float]:
    """Residual norms at ``layer``: token 0 and the median other token (mean over samples), and the peak ratio."""
    first = float(np.nanmean(p.residual_norm[:, layer, 0]))
    other = float(np.nanmean([np.median(p.residual_norm[i, layer, 1:n]) for i, n in enumerate(p.lengths) if n > 1]))
    return {"layer": layer, "first_norm": first, "median_other_norm": other,
            "residual_peak": float(np.nanmax(p.residual_ratio())),
            "value_ratio_median": float(np.nanmedian(np.nanmean(p.value_ratio(), axis=1)))}


@section("drains", "Value drains, residual peaks and massive activations")
def drains(ctx: ReportContext, sec: Section, progress: Progress) -> None:
    """Norms by layer for the sink vs ordinary tokens and the top massive-activation dimensions."""
    from sinkscope.viz import plots, report_plots

    o = ctx.options
    profs = ctx.get_profiles(o.sink_kinds, progress)
    p = next(iter(profs.values()))
    rr = p.residual_ratio()
    vr = np.nanmean(p.value_ratio(), axis=1)  # (La,)
    peak_from = next((l for l, r in enumerate(rr) if r >= 10), None)
    dims: dict[int, dict[str, Any]] = {}
    for m in p.massive:
        for e in m["top"]:
            if e["value"] > 100 and e["ratio_to_median"] > 100:
                d = dims.setdefault(e["dim"], {"dim": e["dim"], "max_value": 0.0, "layers": 0, "positions": set(),
                                               "_layers": set()})
                d["max_value"] = max(d["max_value"], e["value"])
                d["_layers"].add(m["layer"])
                d["positions"].add(e["position"])
    dim_rows = []
    for d in sorted(dims.values(), key=lambda d: -d["max_value"]):
        dim_rows.append({"dim": d["dim"], "max_value": d["max_value"], "layers": len(d["_layers"]),
                         "first layer": min(d["_layers"]), "positions": " ".join(map(str, sorted(d["positions"])))})
    best = max(p.massive, key=lambda m: m["top"][0]["value"] if m["top"] else 0, default=None)
    sec.data.update({
        "input": p.inputs["kind"],
        "residual_ratio_by_layer": rr.tolist(), "value_ratio_by_layer": vr.tolist(),
        "residual_peak": {"layer": int(np.nanargmax(rr)), "ratio": float(np.nanmax(rr))} if np.isfinite(rr).any()
        else None,
        "peak_from_layer": peak_from, "value_ratio_median": float(np.nanmedian(vr)),
        "drain_layers": int((vr < 0.5).sum()), "n_layers": int(len(vr)),
        "massive_dims": [{k: v for k, v in r.items() if k != "positions"} for r in dim_rows],
        "massive_max": best["top"][0]["value"] if best and best["top"] else None,
        "massive_median": best["median_abs"] if best else None,
        "by_kind": {k: _norms_of(q, int(np.nanargmax(rr))) for k, q in profs.items()},
    })
    sec.text("Residual-state peak: the norm of token 0's hidden state after each layer over the median token's. "
             "Value-state drain: the norm of token 0's value vector over the median token's (Guo et al. "
             "2410.13835). Massive activations: hidden entries with |x| > 100 and far above the median magnitude "
             "(Sun et al. 2402.17762).")
    sec.figure(report_plots.norms_by_layer(profs), "Token 0 vs the median token, by layer, per input kind.")
    sec.figure(plots.residual_norm_by_layer(p), f"Residual norm by layer ({p.inputs['kind']}).")
    sec.figure(report_plots.massive_by_layer(p), f"Largest hidden entry per layer ({p.inputs['kind']}).")
    layer_rows = [{"layer": l, "residual ratio": float(rr[l]),
                   "value ratio": float(vr[p.attention_layers.index(l)]) if l in p.attention_layers else None,
                   "max |x|": p.massive[l]["top"][0]["value"] if l < len(p.massive) and p.massive[l]["top"] else None,
                   "dim": p.massive[l]["top"][0]["dim"] if l < len(p.massive) and p.massive[l]["top"] else None,
                   "median |x|": p.massive[l]["median_abs"] if l < len(p.massive) else None}
                  for l in range(len(rr))]
    sec.table(dim_rows, caption="Top massive-activation dimensions", csv="massive_dims.csv", max_rows=10)
    sec.table(layer_rows, caption="Per layer (token 0 over the median token)", csv="norms_by_layer.csv")
    for q in explain.explain_drains(sec.data):
        sec.explain(q)


# ---- 4. active vs dormant heads --------------------------------------------------------------------------------
@section("dormant", "Active vs dormant heads")
def dormant(ctx: ReportContext, sec: Section, progress: Progress) -> None:
    """Per head, alpha_0 and output norm on each domain; heads ranked by how much they depend on the domain."""
    from sinkscope.viz import report_plots

    o = ctx.options
    profs = ctx.get_profiles(o.domains, progress)
    rep = dormancy_from_profiles(profs, threshold=o.dormant_threshold)
    ctx.dormancy = rep
    rows = rep.rows()
    summary = rep.summary()
    sec.data.update({"summary": summary, "top": rows[:10]})
    sec.text(f"A head is dormant on a domain when its mean attention on token 0 (alpha_0) is at least "
             f"{o.dormant_threshold}: it then writes almost nothing (Guo et al. 2410.13835). Domains: "
             f"{', '.join(rep.domains)} ({o.samples} samples of {o.n_tokens} tokens each). 'dependence' is the "
             "range of alpha_0 over the domains; 'out_norm_ratio' the largest over the smallest output norm. "
             "Click a column header to sort.")
    sec.figure(report_plots.dormancy_heatmaps(rep), "alpha_0 per head on each domain, and its range.")
    cols = ["layer", "head", "class", "dependence", "most_dormant_on", "most_active_on", "out_norm_ratio",
            *[f"alpha0_{d}" for d in rep.domains]]
    sec.table(rows, columns=cols, caption="Heads, most domain-dependent first (sortable)", csv="heads_dormancy.csv")
    for q in explain.explain_dormant({**summary, "top": rows[:3]}):
        sec.explain(q)
    progress(1, 1)


def _repetition(ctx: ReportContext, sec: Section, progress: Progress) -> None:
    from sinkscope.report.repetition import repetition_section

    repetition_section(ctx, sec, progress)


SECTIONS.add("repetition", ("Repetition", _repetition))


def _kv_heads(ctx: ReportContext, sec: Section, progress: Progress) -> None:
    from sinkscope.report.kv import kv_section

    kv_section(ctx, sec, progress)


SECTIONS.add("kv", ("KV heads", _kv_heads))

#: Display order of the sections.
SECTION_ORDER: tuple[str, ...] = ("model", "sinks", "drains", "dormant", "kv", "repetition")
