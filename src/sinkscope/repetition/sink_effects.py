"""How much of token 0's sink a position-0 ablation removes: the exact measure, batched, and its gradient estimate.

The measure (on short ordinary text, eager attention): ``residual`` = mean over layers and rows of
``log(||x_l[0]|| / median_t ||x_l[t]||)`` (``x_l``: the model's hidden state after layer ``l``, the last one after
the final norm), ``attention`` = mean over attention layers of the mean attention on key 0 (over rows, heads and
queries). A component ablated at position 0 of layer ``l`` leaves every layer before ``l`` untouched, so:

* `ablation_effects` runs only layers ``l..L-1``, from the cached input of layer ``l`` of the unablated pass, and
  runs several ablated variants in one forward along the batch axis (`ablate_rows`); it returns what
  `reference_effects` (one full forward per component, the original algorithm) returns, up to float rounding.
* `attribution_effects` estimates every candidate's change of both measures from one forward and two backward
  passes (activation x gradient at position 0: ``(fill - a) . d measure / d a``).
* `search_effects` ablates every candidate, or (pruned) those of layers where a joint ablation shows the estimates
  cannot be trusted plus the best-estimated others.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sinkscope.interventions.ablate import Component, ablate, ablate_rows
from sinkscope.models.adapters import ModelAdapter, get_adapter
from sinkscope.repetition.activations import few_logits

Progress = Callable[[int, int], None]


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Eager attention while the block runs (attention weights are returned; short inputs only)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def _layer_terms(hidden: Sequence[Tensor], attentions: Sequence[Tensor | None], groups: int) -> tuple[Tensor, Tensor]:
    """Per-layer terms of the measure for ``groups`` variants stacked along the batch axis.

    Returns ``log_ratio`` (L', groups, B) and ``alpha0`` (A', groups): L' hidden states, A' attention layers.
    """
    hs = torch.stack([h.float().norm(dim=-1) for h in hidden])  # (L', G*B, T)
    ratio = hs[..., 0] / hs[..., 1:].median(dim=-1).values  # (L', G*B)
    log_ratio = ratio.clamp_min(1e-6).log()
    log_ratio = log_ratio.reshape(log_ratio.shape[0], groups, -1)
    att = [x[..., 0].float().reshape(groups, -1).mean(dim=1) for x in attentions if x is not None]  # (G,) each
    alpha0 = torch.stack(att) if att else torch.zeros(0, groups)
    return log_ratio, alpha0


@torch.no_grad()
def sink_measure(model: nn.Module, ids: Tensor) -> tuple[float, float]:
    """(residual, attention) of the measure on unpadded ``ids`` (B, T): one full forward, as the original search
    ran it (the reference the fast path is tested against). The model must be in eager attention."""
    out = model(input_ids=ids, output_attentions=True, output_hidden_states=True, use_cache=False)
    hs = torch.stack([h.float().norm(dim=-1) for h in out.hidden_states[1:]])  # (L, B, T)
    ratio = hs[..., 0] / hs[..., 1:].median(dim=-1).values  # (L, B)
    att = torch.stack([a[..., 0].float().mean() for a in out.attentions if a is not None])
    return float(ratio.clamp_min(1e-6).log().mean()), float(att.mean())


@dataclass
class SinkBaseline:
    """The unablated pass, cached for truncated ablated passes.

    Attributes:
        ids: (B, T) the text.
        log_ratio: (L, B) per-layer ``log(||x_l[0]|| / median ||x_l[t]||)``.
        alpha0: (A,) per attention layer, the mean attention on key 0.
        layer_inputs: the input hidden state of each decoder layer, (B, T, d_model) each.
    """

    ids: Tensor
    log_ratio: Tensor
    alpha0: Tensor
    layer_inputs: list[Tensor]

    @property
    def residual(self) -> float:
        return float(self.log_ratio.mean())

    @property
    def attention(self) -> float:
        return float(self.alpha0.mean())


@torch.no_grad()
def sink_baseline(model: nn.Module, ids: Tensor) -> SinkBaseline:
    """The unablated measure and every decoder layer's input (model in eager attention)."""
    a = get_adapter(model)
    inputs: dict[int, Tensor] = {}

    def grab(l: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            inputs[l] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    handles = [m.register_forward_pre_hook(grab(l), with_kwargs=True) for l, m in enumerate(a.layer_modules)]
    try:
        out = model(input_ids=ids, output_attentions=True, output_hidden_states=True, use_cache=False,
                    **few_logits(model))
    finally:
        for h in handles:
            h.remove()
    log_ratio, alpha0 = _layer_terms(out.hidden_states[1:], out.attentions, 1)
    return SinkBaseline(ids, log_ratio[:, 0], alpha0[:, 0], [inputs[l] for l in range(a.n_layers)])


@contextlib.contextmanager
def _from_layer(model: nn.Module, a: ModelAdapter, layer: int, hidden: Tensor) -> Iterator[None]:
    """Run only decoder layers ``layer..L-1``, the first of them on ``hidden`` instead of what precedes it.

    The model's own forward still runs (embeddings, masks, positions, final norm, output collection) with its
    layer list (and a per-layer ``config.layer_types``, which some models index by position in that list) cut
    to ``[layer:]`` for the duration of the block; both are restored on exit.
    """
    parent_path, _, name = a.spec.layers.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    full = getattr(parent, name)
    cfg = model.config
    types = getattr(cfg, "layer_types", None)
    cut_types = isinstance(types, (list, tuple)) and len(types) == len(full)

    def replace(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = full[layer].register_forward_pre_hook(replace, with_kwargs=True)
    setattr(parent, name, nn.ModuleList(list(full)[layer:]))
    if cut_types:
        cfg.layer_types = type(types)(types[layer:])
    try:
        yield
    finally:
        setattr(parent, name, full)
        if cut_types:
            cfg.layer_types = types
        handle.remove()


def _variants_forward(model: nn.Module, a: ModelAdapter, base: SinkBaseline, start: int,
                      groups: Sequence[Sequence[Component]], mode: str, means: dict[Component, Any] | None
                      ) -> tuple[Tensor, Tensor] | None:
    """(residual (G,), attention (G,)) of ``groups`` ablated variants in one forward that starts at layer
    ``start`` (0: the whole model); None when the cut model's outputs do not line up with its layers."""
    G, B = len(groups), base.ids.shape[0]
    ids = base.ids.repeat(G, 1)  # (G*B, T)
    n_att_before = sum(1 for x in a.attention_layers if x < start)
    cut = _from_layer(model, a, start, base.layer_inputs[start].repeat(G, 1, 1)) if start else contextlib.nullcontext()
    with ablate_rows(model, groups, rows=B, positions="first", mode=mode, means=means), cut:
        out = model(input_ids=ids, output_attentions=True, output_hidden_states=True, use_cache=False,
                    **few_logits(model))
    hidden = out.hidden_states[1:]
    n_att = sum(1 for x in out.attentions if x is not None)
    if len(hidden) != a.n_layers - start or n_att != len(a.attention_layers) - n_att_before:
        return None
    log_ratio, alpha0 = _layer_terms(hidden, out.attentions, G)
    res = torch.cat([base.log_ratio[:start, None, :].expand(start, G, B), log_ratio])  # (L, G, B)
    att = torch.cat([base.alpha0[:n_att_before, None].expand(n_att_before, G), alpha0])  # (A, G)
    return res.permute(1, 0, 2).reshape(G, -1).mean(dim=1), att.mean(dim=0)


def _same(x: float, y: float, rtol: float = 1e-4, atol: float = 1e-6) -> bool:
    return abs(x - y) <= atol + rtol * abs(y)


@torch.no_grad()
def variant_effects(model: nn.Module, base: SinkBaseline, variants: Sequence[Sequence[Component]], *,
                    mode: str = "zero", means: dict[Component, Any] | None = None, max_rows: int = 96,
                    progress: Progress | None = None) -> list[tuple[float, float]]:
    """(residual, attention) of the measure with each variant's components ablated together at position 0.

    Variants are grouped by their first layer; each group runs from that layer's cached input,
    ``max_rows // B`` variants per forward. The first cut forward carries one unablated variant as a control:
    if it does not reproduce the baseline (a model whose forward does not survive the cut), every forward runs
    the whole model instead. Model in eager attention. ``progress(done, total)`` counts variants.
    """
    a = get_adapter(model)
    B = base.ids.shape[0]
    per_forward = max(1, max_rows // B)
    by_layer: dict[int, list[int]] = {}
    for i, v in enumerate(variants):
        if not v:
            raise ValueError("an ablated variant needs at least one component")
        by_layer.setdefault(min(c.layer for c in v), []).append(i)
    out: list[tuple[float, float]] = [(float("nan"), float("nan"))] * len(variants)
    truncate, checked, done = True, False, 0
    for layer in sorted(by_layer):
        rows = by_layer[layer]
        for s in range(0, len(rows), per_forward):
            chunk = rows[s:s + per_forward]
            groups: list[Sequence[Component]] = [variants[i] for i in chunk]
            start = layer if truncate else 0
            control = start > 0 and not checked
            got = _variants_forward(model, a, base, start, groups + [[]] * control, mode, means)
            if control:
                checked = True
                ok = got is not None and _same(float(got[0][-1]), base.residual) and _same(float(got[1][-1]),
                                                                                          base.attention)
                if not ok:  # the cut changed the unablated model: run whole forwards from here on
                    truncate = False
                    got = _variants_forward(model, a, base, 0, groups, mode, means)
            if got is None:
                raise RuntimeError("the model's hidden states / attentions do not match its layers")
            for i, r, t in zip(chunk, got[0].tolist(), got[1].tolist()):
                out[i] = (r, t)
            done += len(chunk)
            if progress is not None:
                progress(done, len(variants))
    return out


def ablation_effects(model: nn.Module, base: SinkBaseline, components: Sequence[Component], *, mode: str = "zero",
                     means: dict[Component, Any] | None = None, max_rows: int = 96,
                     progress: Progress | None = None) -> dict[Component, tuple[float, float]]:
    """(residual, attention) of the measure with each component ablated alone at position 0 (`variant_effects`
    with one component per variant; model in eager attention)."""
    got = variant_effects(model, base, [[c] for c in components], mode=mode, means=means, max_rows=max_rows,
                          progress=progress)
    return dict(zip(components, got))


@torch.no_grad()
def reference_effects(model: nn.Module, ids: Tensor, components: Sequence[Component], *, mode: str = "zero",
                      means: dict[Component, Any] | None = None,
                      progress: Progress | None = None) -> dict[Component, tuple[float, float]]:
    """The original algorithm: one full forward per component (`ablate` + `sink_measure`; model in eager)."""
    out: dict[Component, tuple[float, float]] = {}
    for c in components:
        with ablate(model, [c], positions="first", mode=mode, means=means):
            out[c] = sink_measure(model, ids)
        if progress is not None:
            progress(len(out), len(components))
    return out


def attribution_effects(model: nn.Module, base: SinkBaseline, components: Sequence[Component], *,
                        mode: str = "zero", means: dict[Component, Any] | None = None
                        ) -> dict[Component, tuple[float, float]]:
    """First-order estimate of (residual, attention) with each component ablated at position 0.

    One forward with gradients and one backward pass per measure: for a component with activation ``a`` at
    position 0 (a neuron's scalar, a head's (d_head,) output; every row), the estimate is
    ``measure + sum_rows (fill - a) . d measure / d a`` (``fill``: 0, or the component's mean). Model in eager.
    """
    a = get_adapter(model)
    targets: dict[nn.Module, int] = {}
    for c in components:
        mod = a.mlp_down_module(c.layer) if c.kind == "neuron" else a.output_projection(c.layer)
        targets[mod] = c.layer if c.kind == "neuron" else -1 - c.layer  # key: (neuron layer) or (-1 - head layer)
    acts: dict[int, Tensor] = {}

    def keep(key: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            acts[key] = args[0]
        return hook

    def leaf(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        return output.detach().requires_grad_(True)  # the graph starts at the embeddings, not at the weights

    handles = [m.register_forward_pre_hook(keep(k)) for m, k in targets.items()]
    handles.append(model.get_input_embeddings().register_forward_hook(leaf))
    try:
        with torch.enable_grad():
            out = model(input_ids=base.ids, output_attentions=True, output_hidden_states=True, use_cache=False,
                        **few_logits(model))
            log_ratio, alpha0 = _layer_terms(out.hidden_states[1:], out.attentions, 1)
            res, att = log_ratio.mean(), alpha0.mean()
            keys = sorted(acts)
            xs = [acts[k] for k in keys]
            g_res = dict(zip(keys, torch.autograd.grad(res, xs, retain_graph=True, allow_unused=True)))
            g_att = dict(zip(keys, torch.autograd.grad(att, xs, allow_unused=True)))
    finally:
        for h in handles:
            h.remove()
    d_head = a.d_head
    est: dict[Component, tuple[float, float]] = {}
    for c in components:
        key = c.layer if c.kind == "neuron" else -1 - c.layer
        sl = slice(c.index, c.index + 1) if c.kind == "neuron" else slice(c.index * d_head, (c.index + 1) * d_head)
        x = acts[key].detach()[:, 0, sl].float()  # (B, n)
        fill = torch.zeros_like(x) if mode == "zero" else torch.as_tensor(means[c], dtype=x.dtype).expand_as(x)  # type: ignore[index]
        delta = fill - x
        moves = []
        for g in (g_res[key], g_att[key]):
            moves.append(0.0 if g is None else float((g[:, 0, sl].float() * delta).sum()))
        est[c] = (float(res.detach()) + moves[0], float(att.detach()) + moves[1])
    return est


#: Linearity check of the pruned search: a layer's candidates of one kind are "linear" when ablating them together
#: moves each measure by the sum of their attribution estimates to within this share of the baseline.
LINEAR_TOL = 0.01


@dataclass
class EffectSearch:
    """What `search_effects` measured.

    Attributes:
        base: the unablated pass.
        exact: (residual, attention) with each exactly ablated component.
        estimates: attribution estimates of every candidate (empty when all were ablated exactly).
        groups: the linearity check, one entry per layer and kind: ``layer``, ``kind``, ``size``, ``joint``
            (shares removed by ablating the group together, residual and attention), ``estimated`` (sum of the
            members' estimated shares), ``linear``.
    """

    base: SinkBaseline
    exact: dict[Component, tuple[float, float]]
    estimates: dict[Component, tuple[float, float]] = field(default_factory=dict)
    groups: list[dict[str, Any]] = field(default_factory=list)

    def shares(self, values: tuple[float, float]) -> tuple[float, float]:
        """(share of the residual peak removed, share of the attention on token 0 removed)."""
        res, att = values
        return ((self.base.residual - res) / max(abs(self.base.residual), 1e-9),
                (self.base.attention - att) / max(abs(self.base.attention), 1e-9))


def search_effects(model: nn.Module, ids: Tensor, components: Sequence[Component], *, exact: int | None,
                   linear_tol: float = LINEAR_TOL, mode: str = "zero", means: dict[Component, Any] | None = None,
                   max_rows: int = 96, progress: Callable[[str, int, int], None] | None = None) -> EffectSearch:
    """Ablate the candidates at position 0: all of them (``exact`` None, or at least their number), else a
    pruned search that ablates exactly:

    1. every candidate of a *nonlinear* group. Groups are a layer's candidates of one kind; each group is ablated
       together once and is nonlinear when that joint change of either measure differs from the sum of its
       members' attribution estimates by more than ``linear_tol`` (share of the baseline). Gradients cannot see
       threshold effects (a component whose removal matters only once it is (nearly) complete, as for some
       early heads of SmolLM2); the joint ablation does.
    2. the ``exact`` other candidates with the largest estimated effect (max of the two shares).

    The rest keep their estimate. ``progress(stage, done, total)``: stages ``baseline``, ``attribution``,
    ``linearity`` (groups), ``ablate`` (components).
    """

    def report(stage: str, done: int, total: int) -> None:
        if progress is not None:
            progress(stage, done, total)

    cands = list(components)
    with eager_attention(model):
        report("baseline", 0, 1)
        found = EffectSearch(sink_baseline(model, ids), {})
        report("baseline", 1, 1)
        chosen = cands
        if exact is not None and len(cands) > exact:
            report("attribution", 0, 1)
            found.estimates = attribution_effects(model, found.base, cands, mode=mode, means=means)
            report("attribution", 1, 1)
            chosen = _prune(model, found, cands, exact, linear_tol, mode, means, max_rows, report)
        todo = [c for c in chosen if c not in found.exact]
        found.exact.update(ablation_effects(model, found.base, todo, mode=mode, means=means, max_rows=max_rows,
                                            progress=lambda d, t: report("ablate", d, t)))
    return found


def _prune(model: nn.Module, found: EffectSearch, cands: list[Component], exact: int, linear_tol: float, mode: str,
           means: dict[Component, Any] | None, max_rows: int, report: Callable[[str, int, int], None]
           ) -> list[Component]:
    """The linearity check (fills ``found.groups``, and ``found.exact`` for one-member groups); returns the
    candidates to ablate exactly."""
    groups: dict[tuple[int, str], list[Component]] = {}
    for c in cands:
        groups.setdefault((c.layer, c.kind), []).append(c)
    keys = sorted(groups)
    joint = variant_effects(model, found.base, [groups[k] for k in keys], mode=mode, means=means,
                            max_rows=max_rows, progress=lambda d, t: report("linearity", d, t))
    nonlinear: set[Component] = set()
    for (layer, kind), values in zip(keys, joint):
        members = groups[(layer, kind)]
        js = found.shares(values)
        est = [sum(found.shares(found.estimates[c])[i] for c in members) for i in (0, 1)]
        linear = all(abs(j - e) <= linear_tol for j, e in zip(js, est))
        found.groups.append({"layer": layer, "kind": kind, "size": len(members), "joint": list(js),
                             "estimated": est, "linear": linear})
        if len(members) == 1:
            found.exact[members[0]] = values  # its joint ablation is its own
        if not linear:
            nonlinear.update(members)
    rest = sorted((c for c in cands if c not in nonlinear), key=lambda c: -max(found.shares(found.estimates[c])))
    keep = nonlinear | set(rest[:exact]) | set(found.exact)
    return [c for c in cands if c in keep]
