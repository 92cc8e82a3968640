"""The sink-circuit patch: keep the first-token signal from appearing anywhere but at each row's true first token.

A `SinkPatch` holds two kinds of rules:

* `DirectionRule` (the default patch): the residual stream after one decoder layer, projected on the
  first-token direction ``u`` (mean first-token state minus mean other-token state, unit norm). Where the
  projection ``p = x . u`` exceeds ``threshold`` (its ordinary-text range) it is set back to ``value`` (its
  ordinary-text median): ``x <- x - (p - value) u``. A forward hook on that decoder layer does it.
* `NeuronRule`: MLP neurons (inputs of the down projection) replaced by ``value[j]`` wherever
  ``|a[b, t, j]| > threshold[j]``. A forward pre-hook on the down projection does it.

Neither rule ever touches row ``b``'s first real token. With a `RepetitionGate`, rules act only at positions
whose input embedding resembles the preceding ``window`` tokens' (mean cosine >= ``min_cos``: inside a run of
one repeated token, or of near-identical tokens), which ordinary text practically never is. Positions and the
gate follow each row's real tokens under left padding and KV cache: a pre-hook on the decoder captures
``input_ids``, ``attention_mask`` / ``position_ids`` / the cache length of every call and keeps the last
``window`` token ids of each row between calls.

The edit is conditional and position-dependent, so it cannot be folded into weights: a saved patch is a manifest
(`sinkscope_manifest.json`) naming the base model and the rules; `sinkscope.load_model(DIR)` restores it.
No module's ``forward`` is replaced.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from sinkscope.artefacts import read_manifest, write_manifest
from sinkscope.compat import cached_length, find_cache
from sinkscope.errors import InputError, ModelLoadError
from sinkscope.models.adapters import ModelAdapter, get_adapter
from sinkscope.models.load import PACKAGED_MODELS, ModelSource, load_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel

MANIFEST_KIND = "repeat_patch"
MANIFEST_VERSION = 2  # version 1 (neuron rules only) still loads
#: every key a manifest may hold
MANIFEST_KEYS = frozenset({"kind", "version", "base_model", "protect_first", "rules", "directions", "gate",
                           "attention_dedup", "dedup_keep", "dedup_queries", "dedup_reach", "meta"})
#: which queries discount the flagged keys (`SinkPatch.dedup_queries`)
DEDUP_QUERIES = ("all", "gated")


@dataclass(frozen=True)
class NeuronRule:
    """Clamp rule for some neurons of one layer (lists are aligned).

    Attributes:
        layer: decoder layer index.
        index: neuron indices (columns of the down projection's input).
        threshold: |activation| above which the neuron counts as firing (its ordinary-text range).
        value: what a firing neuron is set to (its ordinary-text median).
    """

    layer: int
    index: list[int]
    threshold: list[float]
    value: list[float]

    def __post_init__(self) -> None:
        if not (len(self.index) == len(self.threshold) == len(self.value)):
            raise InputError(f"layer {self.layer}: index, threshold and value must have the same length")


@dataclass(frozen=True)
class DirectionRule:
    """Clamp of the residual stream after decoder layer ``layer`` along one direction.

    Attributes:
        layer: decoder layer whose output is edited.
        direction: unit vector, length d_model (the first-token direction of that layer).
        threshold: projection above which a position counts as first-like (ordinary-text range).
        value: projection a first-like position is set back to (ordinary-text median).
    """

    layer: int
    direction: list[float]
    threshold: float
    value: float

    def __post_init__(self) -> None:
        if not self.direction:
            raise InputError(f"layer {self.layer}: empty direction")


@dataclass(frozen=True)
class RepetitionGate:
    """Where rules may act: positions whose input embedding has mean cosine >= ``min_cos`` with each of the
    previous ``window`` real tokens' (all of which must exist). A run of one token has cosine 1."""

    window: int = 32
    min_cos: float = 0.8

    def __post_init__(self) -> None:
        if self.window < 1 or not -1.0 <= self.min_cos <= 1.0:
            raise InputError(f"gate needs window >= 1 and min_cos in [-1, 1], got {self.window}, {self.min_cos}")


@dataclass(frozen=True)
class SinkPatch:
    """Neuron and direction rules, an optional repetition gate, plus provenance.

    Attributes:
        rules: one `NeuronRule` per patched layer (may be empty).
        base_model: spec of the model the rules were measured on (alias, directory, hub id).
        protect_first: never touch each row's first real token (the true sink).
        meta: how the patch was built (words, calibration corpus, margins).
        directions: `DirectionRule` s (may be empty).
        gate: if set, every rule acts only where the `RepetitionGate` is open.
        attention_dedup: keys where the gate is open (the inside of a repetition) share one key's attention:
            for a query that sees ``c`` of them, their logits are lowered by ``log(c)`` in every layer and head.
        dedup_keep: the flagged keys a query sees keep the weight of this many keys: their logits are lowered by
            ``log(c / dedup_keep)`` only once ``c > dedup_keep`` (0 or 1: counted as one key). With the gate's
            window, a run of up to ``window + dedup_keep`` copies is left exactly alone.
        dedup_queries: ``all`` (every later query discounts the flagged keys, also after the repetition ended) or
            ``gated`` (only queries where the gate is open themselves, i.e. inside a repetition, and the
            ``dedup_reach`` positions after the last one: text further after a repetition attends to it normally).
        dedup_reach: with ``gated``, queries up to this many positions after the last open gate still discount
            (0: only queries inside the repetition).
    """

    rules: list[NeuronRule]
    base_model: str = ""
    protect_first: bool = True
    meta: dict[str, Any] = field(default_factory=dict)
    directions: list[DirectionRule] = field(default_factory=list)
    gate: RepetitionGate | None = None
    attention_dedup: bool = False
    dedup_keep: int = 1
    dedup_queries: str = "all"
    dedup_reach: int = 0

    def __post_init__(self) -> None:
        if self.attention_dedup and self.gate is None:
            raise InputError("attention_dedup needs a repetition gate (it acts on the keys inside repetitions)")
        if self.dedup_reach < 0:
            raise InputError(f"dedup_reach must be >= 0, got {self.dedup_reach}")
        if self.dedup_keep < 0:
            raise InputError(f"dedup_keep must be >= 0, got {self.dedup_keep}")
        if self.dedup_queries not in DEDUP_QUERIES:
            raise InputError(f"dedup_queries must be one of {', '.join(DEDUP_QUERIES)}, got {self.dedup_queries!r}")

    @property
    def n_neurons(self) -> int:
        return sum(len(r.index) for r in self.rules)

    @property
    def layers(self) -> list[int]:
        """Layers the patch edits (neuron and direction rules)."""
        return sorted({r.layer for r in self.rules} | {r.layer for r in self.directions})

    def describe(self) -> str:
        """One line: what the patch edits and where."""
        parts = []
        if self.directions:
            parts.append(f"first-token direction after layer(s) {[r.layer for r in self.directions]} clamped to its "
                         "ordinary range")
        if self.rules:
            parts.append(f"{self.n_neurons} neurons in layer(s) {[r.layer for r in self.rules]}")
        if self.attention_dedup:
            keep = "once" if self.dedup_keep <= 1 else f"as {self.dedup_keep} keys"
            who = "" if self.dedup_queries == "all" else " by queries inside repetitions" + (
                f" and {self.dedup_reach} tokens after" if self.dedup_reach else "")
            parts.append(f"attention to repeated keys counted {keep}{who}")
        gate = (f", only inside repetitions (window {self.gate.window}, mean cosine >= {self.gate.min_cos})"
                if self.gate else "")
        return " + ".join(parts) + gate

    def to_json(self) -> dict[str, Any]:
        return {"kind": MANIFEST_KIND, "version": MANIFEST_VERSION, "base_model": self.base_model,
                "protect_first": self.protect_first, "rules": [asdict(r) for r in self.rules],
                "directions": [asdict(r) for r in self.directions],
                "gate": asdict(self.gate) if self.gate else None, "attention_dedup": self.attention_dedup,
                "dedup_keep": self.dedup_keep, "dedup_queries": self.dedup_queries, "dedup_reach": self.dedup_reach,
                "meta": self.meta}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SinkPatch:
        """The patch of a manifest dict; `ModelLoadError` (one line) for another kind, an unknown version, an
        unknown key, or a rule whose numbers are not finite (such a rule would silently never act)."""
        if not isinstance(d, dict) or d.get("kind") != MANIFEST_KIND:
            kind = d.get("kind") if isinstance(d, dict) else None
            raise ModelLoadError(f"not a repeat patch manifest (kind {kind!r})")
        if d.get("version", 1) not in (1, MANIFEST_VERSION):
            raise ModelLoadError(f"repeat patch manifest version {d.get('version')!r} is not one this sinkscope reads "
                                 f"(1 or {MANIFEST_VERSION}): made by a newer sinkscope?")
        unknown = sorted(set(d) - MANIFEST_KEYS)
        if unknown:
            raise ModelLoadError(f"repeat patch manifest has unknown key(s) {', '.join(unknown)}")
        for what, keys, rs in (("neuron", {"layer", "index", "threshold", "value"}, d.get("rules") or []),
                                ("direction", {"layer", "direction", "threshold", "value"}, d.get("directions") or [])):
            for r in rs:
                extra = sorted(set(r) - keys) if isinstance(r, dict) else []
                if extra:
                    raise ModelLoadError(f"{what} rule has unknown key(s) {', '.join(extra)}")
        rules = [NeuronRule(int(r["layer"]), [int(i) for i in r["index"]], [float(x) for x in r["threshold"]],
                            [float(x) for x in r["value"]]) for r in d["rules"]]
        dirs = [DirectionRule(int(r["layer"]), [float(x) for x in r["direction"]], float(r["threshold"]),
                              float(r["value"])) for r in d.get("directions") or []]
        for r in rules:
            if not all(math.isfinite(x) for x in (*r.threshold, *r.value)):
                raise ModelLoadError(f"neuron rule for layer {r.layer} has a threshold or value that is not a finite "
                                     "number")
        for dr in dirs:
            if not all(math.isfinite(x) for x in (dr.threshold, dr.value, *dr.direction)):
                raise ModelLoadError(f"direction rule for layer {dr.layer} has a number that is not finite")
        g = d.get("gate")
        gate = RepetitionGate(int(g["window"]), float(g["min_cos"])) if g else None
        return cls(rules, str(d.get("base_model", "")), bool(d.get("protect_first", True)), dict(d.get("meta", {})),
                   dirs, gate, bool(d.get("attention_dedup", False)), int(d.get("dedup_keep", 1)),
                   str(d.get("dedup_queries", "all")), int(d.get("dedup_reach", 0)))


def relative_positions(n_query: int, attention_mask: Tensor | None, position_ids: Tensor | None,
                       past_length: int) -> Tensor:
    """Position of each query relative to its row's first real token: (B, Q) (-1 at padded positions).

    With a 2-D ``attention_mask`` (B, past + Q) — what `generate` passes under left padding and KV cache —
    the position is ``cumsum(mask) - 1`` over the real tokens. Without a mask, ``position_ids`` if given, else
    ``past_length + arange(Q)``.
    """
    if attention_mask is not None and attention_mask.dim() == 2:
        m = attention_mask.long()
        rel = (m.cumsum(dim=-1) - 1)[:, -n_query:]
        return rel.masked_fill(m[:, -n_query:] == 0, -1)
    if position_ids is not None:
        return position_ids.long()
    return torch.arange(past_length, past_length + n_query)[None, :]


def repetition_gate(embedding: Tensor, ids: Tensor, real: Tensor, tail_ids: Tensor, tail_real: Tensor,
                    gate: RepetitionGate) -> Tensor:
    """Open/closed gate for each query: (B, Q) bool.

    Args:
        embedding: (V, d) input embedding matrix (rows are normalised here, only those used).
        ids, real: (B, Q) this call's token ids and real-token mask.
        tail_ids, tail_real: (B, window) the previous ``window`` positions (ids, real mask) before this call.

    A query is open when all ``window`` positions before it are real and the mean cosine of its embedding with
    theirs is >= ``gate.min_cos`` (a prefix sum over the concatenated tail + call: O((window + Q) d)).
    """
    W = gate.window
    all_ids = torch.cat([tail_ids, ids], dim=1)  # (B, W + Q)
    e = torch.nn.functional.normalize(embedding[all_ids].float(), dim=-1)  # (B, W + Q, d)
    all_real = torch.cat([tail_real, real], dim=1).to(e.dtype)
    e = e * all_real[..., None]
    zero = e.new_zeros(e.shape[0], 1, e.shape[2])
    csum = torch.cat([zero, e.cumsum(dim=1)], dim=1)  # csum[:, j] = sum of positions < j
    cnt = torch.cat([all_real.new_zeros(e.shape[0], 1), all_real.cumsum(dim=1)], dim=1)
    Q = ids.shape[1]
    j = torch.arange(W, W + Q, device=ids.device)  # index of each query in the concatenation
    win = csum[:, j] - csum[:, j - W]  # (B, Q, d): sum of the W positions before the query
    n = cnt[:, j] - cnt[:, j - W]
    mean_cos = (win * e[:, j]).sum(-1) / W
    return (n >= W - 0.5) & real.bool() & (mean_cos >= gate.min_cos)


def dedup_mask(flags: Tensor, mask2d: Tensor | None, n_query: int, dtype: torch.dtype, *, keep: int = 1,
               queries: Tensor | None = None) -> Tensor:
    """Additive attention mask (B, 1, Q, K) for the last ``n_query`` of ``K`` positions: causal and padding
    masking, plus ``-log(c / keep)`` on flagged keys when ``c > keep``, where ``c`` is how many flagged keys the
    query sees (so together they weigh like ``keep`` keys with their mean logit; ``keep`` <= 1: like one key).

    Args:
        flags: (B, K) bool, keys inside a repetition.
        mask2d: (B, K) 1 = real token, or None (all real).
        queries: (B, Q) bool, the queries that discount (None: all of them).
    """
    B, K = flags.shape
    q_pos = torch.arange(K - n_query, K, device=flags.device)
    visible = torch.arange(K, device=flags.device)[None, :] <= q_pos[:, None]  # (Q, K)
    visible = visible[None].expand(B, -1, -1)
    if mask2d is not None:
        visible = visible & mask2d[:, None, :].bool()
        # a padded query sees no key: let it see itself, so that its (unused) output does not depend on whether
        # the sequence is processed whole or step by step
        empty = ~visible.any(-1)  # (B, Q)
        if bool(empty.any()):
            own = torch.zeros_like(visible)
            own[:, torch.arange(n_query, device=flags.device), q_pos] = True
            visible = visible | (own & empty[..., None])
    seen = (flags.long().cumsum(dim=1))[:, q_pos]  # (B, Q): flagged keys up to each query
    scale = (seen.to(torch.float32) / max(keep, 1)).clamp_min(1.0)
    if queries is not None:
        scale = torch.where(queries.to(scale.device), scale, torch.ones_like(scale))
    bias = -torch.log(scale)[..., None] * flags[:, None, :]  # (B, Q, K)
    out = torch.where(visible, bias, torch.full_like(bias, torch.finfo(dtype).min))
    return out.to(dtype)[:, None]


class PatchHandle:
    """Installed hooks of a `SinkPatch` on one model; `remove()` (or leaving the ``with`` block) uninstalls."""

    def __init__(self, model: nn.Module, patch: SinkPatch, adapter: ModelAdapter | None = None) -> None:
        self.model = model
        self.patch = patch
        self.adapter = adapter or get_adapter(model)
        self._rel: Tensor | None = None
        self._gate: Tensor | None = None
        self._tail: tuple[Tensor, Tensor] | None = None
        self.enabled = True
        self.n_clamped = 0  # how many (row, position, neuron or direction) values were replaced since install
        self.n_gated = 0  # how many (row, position) the repetition gate opened since install
        self._handles: list[Any] = []
        decoder = self._decoder()
        self._flags: Tensor | None = None  # (B, keys so far): the gate was open at that key (attention_dedup)
        self._last_open: Tensor | None = None  # (B,): key index of the last open gate (dedup_queries="gated")
        if patch.attention_dedup:
            windows = [self.adapter.sliding_window(l) for l in range(self.adapter.n_layers)]
            if any(windows):
                raise InputError("attention_dedup replaces the attention mask and supports only models without "
                                 "sliding-window layers")
        self._handles.append(decoder.register_forward_pre_hook(self._capture, with_kwargs=True))
        for rule in patch.rules:
            self._check_layer(rule.layer)
            down = self.adapter.mlp_down_module(rule.layer)
            if down is None:
                raise InputError(f"layer {rule.layer} has no dense MLP to patch")
            idx = torch.tensor(rule.index, dtype=torch.long)
            thr = torch.tensor(rule.threshold, dtype=torch.float32)
            val = torch.tensor(rule.value, dtype=torch.float32)
            self._handles.append(down.register_forward_pre_hook(
                lambda m, args, idx=idx, thr=thr, val=val: self._clamp(args, idx, thr, val)))
        for drule in patch.directions:
            self._check_layer(drule.layer)
            u = torch.tensor(drule.direction, dtype=torch.float32)
            if u.numel() != self.adapter.d_model:
                raise InputError(f"direction for layer {drule.layer} has {u.numel()} entries, the model's width "
                                 f"is {self.adapter.d_model}")
            self._handles.append(self.adapter.layer_modules[drule.layer].register_forward_hook(
                lambda m, args, out, u=u, r=drule: self._clamp_direction(out, u, r.threshold, r.value)))

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.adapter.n_layers:
            raise InputError(f"patch rule for layer {layer}, but the model has {self.adapter.n_layers}")

    def _decoder(self) -> nn.Module:
        """The module that owns the decoder layers (receives mask, positions and cache on every call)."""
        path = self.adapter.spec.layers.rsplit(".", 1)[0]
        mod: nn.Module = self.model
        for part in path.split("."):
            mod = getattr(mod, part)
        return mod

    def _capture(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                 ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        inputs = ids if ids is not None else emb
        assert inputs is not None  # the decoder is called with input_ids or inputs_embeds
        n_query = int(inputs.shape[1])
        past = cached_length(find_cache(kwargs, args))
        mask = kwargs.get("attention_mask")
        self._rel = relative_positions(n_query, mask, kwargs.get("position_ids"), past)
        gate = self.patch.gate
        if gate is None:
            self._gate = None
            return None
        B = int(inputs.shape[0])
        device = inputs.device
        if ids is None:  # no token ids (inputs_embeds): the gate cannot tell repetitions, so it stays closed
            self._gate, self._tail = torch.zeros(B, n_query, dtype=torch.bool, device=device), None
            return None
        real = (mask[:, -n_query:] if mask is not None and mask.dim() == 2
                else torch.ones(B, n_query, dtype=torch.long, device=device)).long()
        if past == 0 or self._tail is None or self._tail[0].shape[0] != B:
            self._tail = (torch.zeros(B, gate.window, dtype=torch.long, device=device),
                          torch.zeros(B, gate.window, dtype=torch.long, device=device))
        tail_ids, tail_real = self._tail
        # cast: get_adapter accepted the model, so it is an HF causal LM, whose input embedding is an nn.Embedding
        hf_model = cast("PreTrainedModel", self.model)
        weight = cast(nn.Embedding, hf_model.get_input_embeddings()).weight.detach()
        self._gate = repetition_gate(weight, ids, real, tail_ids, tail_real, gate)
        self.n_gated += int(self._gate.sum())
        self._tail = (torch.cat([tail_ids, ids], 1)[:, -gate.window:],
                      torch.cat([tail_real, real], 1)[:, -gate.window:])
        if self.patch.attention_dedup:
            if past == 0 or self._flags is None or self._flags.shape != (B, past):
                self._flags = torch.zeros(B, past, dtype=torch.bool, device=device)
            self._flags = torch.cat([self._flags, self._gate], dim=1)
            queries = None
            if self.patch.dedup_queries == "gated":
                queries = self._discounting_queries(past)
                active = bool(queries.any())
            else:
                active = bool(self._flags.any())
            if self.enabled and active:
                kwargs = dict(kwargs)
                kwargs["attention_mask"] = dedup_mask(self._flags, mask, n_query, hf_model.dtype,
                                                      keep=self.patch.dedup_keep, queries=queries)
                return args, kwargs
        return None

    def _discounting_queries(self, past: int) -> Tensor:
        """(B, Q) bool: this call's queries that discount repeated keys under ``dedup_queries="gated"``: the gate
        is open there, or it was open at most ``dedup_reach`` positions before (also in earlier calls)."""
        gate, flags = self._gate, self._flags
        assert gate is not None and flags is not None  # _capture sets both before it asks
        B, Q = gate.shape
        K = flags.shape[1]
        idx = torch.arange(K - Q, K, device=gate.device)
        never = torch.full((B,), -(10 ** 9), dtype=torch.long, device=gate.device)
        last_open = self._last_open
        if past == 0 or last_open is None or last_open.shape[0] != B:
            last_open = never
        opened = torch.where(gate, idx[None].expand(B, Q), never[:, None].expand(B, Q))
        last = torch.maximum(torch.cummax(opened, dim=1).values, last_open[:, None])
        self._last_open = last[:, -1]
        return (idx[None] - last) <= self.patch.dedup_reach

    def _where(self, B: int, T: int, device: torch.device) -> Tensor | None:
        """(B, T, 1) bool: positions a rule may edit (not a first token, gate open), or None to skip this call."""
        if not self.enabled or self._rel is None:
            return None
        rel = self._rel.to(device)
        if rel.shape[-1] != T:
            return None  # a call we did not see the mask of: leave it alone
        ok = (rel >= 0).expand(B, T)
        if self.patch.protect_first:
            ok = ok & (rel != 0).expand(B, T)
        if self._gate is not None:
            ok = ok & self._gate.to(device)
        return ok[..., None]

    def _clamp(self, args: tuple[Any, ...], idx: Tensor, thr: Tensor, val: Tensor) -> tuple[Any, ...] | None:
        x = args[0]  # (B, T, F)
        where = self._where(x.shape[0], x.shape[1], x.device)
        if where is None:
            return None
        idx, thr, val = idx.to(x.device), thr.to(x.device, x.dtype), val.to(x.device, x.dtype)
        sub = x[..., idx]  # (B, T, n)
        fire = (sub.abs() > thr) & where
        if not bool(fire.any()):
            return None
        self.n_clamped += int(fire.sum())
        x = x.clone()
        x[..., idx] = torch.where(fire, val.expand_as(sub), sub)
        return (x, *args[1:])

    def _clamp_direction(self, out: Any, u: Tensor, thr: float, val: float) -> Any:
        x = out[0] if isinstance(out, tuple) else out  # (B, T, d) residual stream after the layer
        where = self._where(x.shape[0], x.shape[1], x.device)
        if where is None:
            return None
        u = u.to(x.device, x.dtype)
        p = x @ u  # (B, T)
        fire = (p > thr) & where[..., 0]
        if not bool(fire.any()):
            return None
        self.n_clamped += int(fire.sum())
        y = x - ((p - val) * fire)[..., None] * u
        return (y, *out[1:]) if isinstance(out, tuple) else y

    def remove(self) -> None:
        """Uninstall every hook; the model's ``sinkscope_patch`` no longer names this handle."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if getattr(self.model, "sinkscope_patch", None) is self:
            del self.model.sinkscope_patch

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def apply_patch(model: nn.Module, patch: SinkPatch, adapter: ModelAdapter | None = None) -> PatchHandle:
    """Install ``patch`` on ``model`` (in place); use as a context manager or call ``.remove()``.

    ``model.sinkscope_patch`` names the handle while it is installed. ``adapter``: the model's adapter, if the
    caller resolved it already. Example: ``with apply_patch(model, patch): model.generate(...)``.
    """
    handle = PatchHandle(model, patch, adapter)
    model.sinkscope_patch = handle  # type: ignore[assignment]  # nn.Module.__setattr__ is typed Tensor | Module only
    return handle


def save_patch(patch: SinkPatch, directory: str | Path, *, base_model: str | None = None) -> Path:
    """Write ``directory/sinkscope_manifest.json`` (the rules and the base model spec); returns the directory.

    The base model is referenced, not copied: local paths are stored absolute.
    """
    base = base_model or patch.base_model
    if not base:
        raise InputError("a saved patch needs the base model spec (base_model)")
    if base not in PACKAGED_MODELS and Path(base).expanduser().exists():
        base = str(Path(base).expanduser().resolve())
    manifest = dataclasses.replace(patch, base_model=base).to_json()
    return write_manifest(directory, manifest)


def read_patch(directory: str | Path) -> SinkPatch:
    """The patch saved in ``directory`` by `save_patch`.

    Raises:
        ModelLoadError: no manifest, or not a readable repeat patch.
    """
    manifest = read_manifest(directory)
    try:
        return SinkPatch.from_json(manifest)
    except InputError as e:
        raise ModelLoadError(f"broken patch manifest in {directory}: {e}") from None
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise ModelLoadError(f"broken patch manifest in {directory}: {type(e).__name__} {e}") from None


def load_patched_model(path: str | Path, **load_kwargs: Any):
    """Loader behind ``sinkscope.load_model(DIR)`` for a saved patch: the base model with the hooks installed.

    ``load_kwargs`` are `sinkscope.load_model`'s (dtype, device, device_map, revision, ...), applied to the base.
    Returns ``(model, tokenizer)``; ``model.sinkscope_patch`` is the `PatchHandle`.
    """
    patch = read_patch(path)
    if Path(patch.base_model).expanduser().resolve() == Path(path).expanduser().resolve():
        raise ModelLoadError(f"{path}: a patch cannot name itself as its base model")
    if patch.meta.get("base_revision") is not None:
        load_kwargs.setdefault("revision", patch.meta["base_revision"])  # the commit the rules were measured on
    model, tok = load_model(patch.base_model, **load_kwargs)
    apply_patch(model, patch)
    base_src = getattr(model, "sinkscope_source", None)
    model.sinkscope_source = ModelSource(str(path), "manifest", str(path), getattr(base_src, "sha256", None),
                                         getattr(base_src, "revision", None))
    return model, tok


#: the import string of this artefact kind's loader (`sinkscope.artefacts` registers it lazily by this string)
LOADER = "sinkscope.interventions.patch:load_patched_model"
