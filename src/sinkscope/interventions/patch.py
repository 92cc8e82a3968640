"""The sink-circuit patch: keep first-token MLP neurons from firing anywhere but at each row's true first token.

A `SinkPatch` lists, per layer, neurons (inputs of the MLP down projection) with a threshold (their ordinary-text
range) and a replacement value (their ordinary-text median). While installed, a forward pre-hook on each listed
down projection replaces ``a[b, t, j]`` by ``value[j]`` wherever ``|a[b, t, j]| > threshold[j]`` and position ``t``
is not row ``b``'s first real token. Positions are relative to the first real token (left padding, KV cache):
a pre-hook on the decoder captures ``attention_mask`` / ``position_ids`` / the cache length of every call.

The edit is conditional and position-dependent, so it cannot be folded into weights: a saved patch is a manifest
(`sinkscope_manifest.json`) naming the base model and the rules; `sinkscope.load_model(DIR)` restores it.
No module's ``forward`` is replaced.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sinkscope.errors import InputError, ModelLoadError
from sinkscope.models.adapters import get_adapter

MANIFEST_KIND = "repeat_patch"
MANIFEST_VERSION = 1


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
class SinkPatch:
    """A set of neuron rules plus provenance.

    Attributes:
        rules: one `NeuronRule` per patched layer.
        base_model: spec of the model the rules were measured on (alias, directory, hub id).
        protect_first: never touch each row's first real token (the true sink).
        meta: how the patch was built (words, calibration corpus, margins).
    """

    rules: list[NeuronRule]
    base_model: str = ""
    protect_first: bool = True
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_neurons(self) -> int:
        return sum(len(r.index) for r in self.rules)

    def to_json(self) -> dict[str, Any]:
        return {"kind": MANIFEST_KIND, "version": MANIFEST_VERSION, "base_model": self.base_model,
                "protect_first": self.protect_first, "rules": [asdict(r) for r in self.rules], "meta": self.meta}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SinkPatch:
        if d.get("kind") != MANIFEST_KIND:
            raise ModelLoadError(f"not a repeat patch manifest (kind {d.get('kind')!r})")
        rules = [NeuronRule(int(r["layer"]), [int(i) for i in r["index"]], [float(x) for x in r["threshold"]],
                            [float(x) for x in r["value"]]) for r in d["rules"]]
        return cls(rules, str(d.get("base_model", "")), bool(d.get("protect_first", True)), dict(d.get("meta", {})))


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


class PatchHandle:
    """Installed hooks of a `SinkPatch` on one model; `remove()` (or leaving the ``with`` block) uninstalls."""

    def __init__(self, model: nn.Module, patch: SinkPatch) -> None:
        self.model = model
        self.patch = patch
        self.adapter = get_adapter(model)
        self._rel: Tensor | None = None
        self.enabled = True
        self.n_clamped = 0  # how many (row, position, neuron) activations were replaced since install
        self._handles: list[Any] = []
        decoder = self._decoder()
        self._handles.append(decoder.register_forward_pre_hook(self._capture, with_kwargs=True))
        for rule in patch.rules:
            if not 0 <= rule.layer < self.adapter.n_layers:
                raise InputError(f"patch rule for layer {rule.layer}, but the model has {self.adapter.n_layers}")
            down = self.adapter.mlp_down_module(rule.layer)
            if down is None:
                raise InputError(f"layer {rule.layer} has no dense MLP to patch")
            idx = torch.tensor(rule.index, dtype=torch.long)
            thr = torch.tensor(rule.threshold, dtype=torch.float32)
            val = torch.tensor(rule.value, dtype=torch.float32)
            self._handles.append(down.register_forward_pre_hook(
                lambda m, args, idx=idx, thr=thr, val=val: self._clamp(args, idx, thr, val)))

    def _decoder(self) -> nn.Module:
        """The module that owns the decoder layers (receives mask, positions and cache on every call)."""
        path = self.adapter.spec.layers.rsplit(".", 1)[0]
        mod: nn.Module = self.model
        for part in path.split("."):
            mod = getattr(mod, part)
        return mod

    def _capture(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        n_query = int(ids.shape[1]) if ids is not None else int(emb.shape[1])
        cache = kwargs.get("past_key_values")
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        self._rel = relative_positions(n_query, kwargs.get("attention_mask"), kwargs.get("position_ids"), past)

    def _clamp(self, args: tuple[Any, ...], idx: Tensor, thr: Tensor, val: Tensor) -> tuple[Any, ...] | None:
        if not self.enabled or self._rel is None:
            return None
        x = args[0]  # (B, T, F)
        rel = self._rel.to(x.device)
        B, T = x.shape[0], x.shape[1]
        if rel.shape[-1] != T:
            return None  # a call we did not see the mask of: leave it alone
        idx, thr, val = idx.to(x.device), thr.to(x.device, x.dtype), val.to(x.device, x.dtype)
        sub = x[..., idx]  # (B, T, n)
        fire = sub.abs() > thr
        if self.patch.protect_first:
            fire &= (rel != 0).expand(B, T)[..., None]
        if not bool(fire.any()):
            return None
        self.n_clamped += int(fire.sum())
        x = x.clone()
        x[..., idx] = torch.where(fire, val.expand_as(sub), sub)
        return (x, *args[1:])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def apply_patch(model: nn.Module, patch: SinkPatch) -> PatchHandle:
    """Install ``patch`` on ``model`` (in place); use as a context manager or call ``.remove()``.

    Example: ``with apply_patch(model, patch): model.generate(...)``.
    """
    handle = PatchHandle(model, patch)
    model.sinkscope_patch = handle
    return handle


def save_patch(patch: SinkPatch, directory: str | Path, *, base_model: str | None = None) -> Path:
    """Write ``directory/sinkscope_manifest.json`` (the rules and the base model spec); returns the directory.

    The base model is referenced, not copied: local paths are stored absolute.
    """
    from sinkscope.models.load import MANIFEST_NAME, PACKAGED_MODELS

    base = base_model or patch.base_model
    if not base:
        raise InputError("a saved patch needs the base model spec (base_model)")
    if base not in PACKAGED_MODELS and Path(base).expanduser().exists():
        base = str(Path(base).expanduser().resolve())
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    manifest = {**SinkPatch(patch.rules, base, patch.protect_first, patch.meta).to_json()}
    tmp = d / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(d / MANIFEST_NAME)
    return d


def read_patch(directory: str | Path) -> SinkPatch:
    from sinkscope.models.load import MANIFEST_NAME

    p = Path(directory) / MANIFEST_NAME
    if not p.is_file():
        raise ModelLoadError(f"no {MANIFEST_NAME} in {directory}")
    try:
        return SinkPatch.from_json(json.loads(p.read_text()))
    except (KeyError, ValueError, TypeError) as e:
        raise ModelLoadError(f"broken patch manifest {p}: {e}") from e


def load_patched_model(path: str | Path, *, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None,
                       trust_remote_code: bool = False, device: str | torch.device = "cpu"):
    """Loader behind ``sinkscope.load_model(DIR)`` for a saved patch: the base model with the hooks installed.

    Returns ``(model, tokenizer)``; ``model.sinkscope_patch`` is the `PatchHandle`.
    """
    from sinkscope.models.load import ModelSource, load_model

    patch = read_patch(path)
    if Path(patch.base_model).expanduser().resolve() == Path(path).expanduser().resolve():
        raise ModelLoadError(f"{path}: a patch cannot name itself as its base model")
    model, tok = load_model(patch.base_model, dtype=dtype, attn_implementation=attn_implementation,
                            trust_remote_code=trust_remote_code, device=device)
    apply_patch(model, patch)
    base_src = getattr(model, "sinkscope_source", None)
    model.sinkscope_source = ModelSource(str(path), "manifest", str(path), getattr(base_src, "sha256", None))
    return model, tok


def build_patch(circuit: Any, stats: Any, *, base_model: str, fire_min: float = 0.2, margin: float = 1.0,
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
