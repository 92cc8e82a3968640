"""The collector interface: what a model family hands the one profiling loop (`sinkscope.profile.profile_sinks`).

A collector installs its hooks on one model, runs one right-padded batch through it and, while the forward
runs, reduces what it sees to per-layer *records*: ``{statistic name: tensor (B, ...)}``, one dict per attention
layer (`attn`) and one per decoder layer (`layers`). Every name is a field of `SinkProfile` whose metadata gives
its shape (see `sinkscope.profile.stat`); the loop allocates the arrays and copies each record in once per
batch. Two collectors exist: Hugging Face models through the registered attention function
(`sinkscope.collectors.hf`) and tinygpt through its capture points (`sinkscope.collectors.tinygpt`).

Devices and precision: every record stays on the device of the layer that produced it until the loop copies it
to the host, and masks are moved to each layer's device (`valid_on`), so a model spread over several devices
(``device_map="auto"``) is measured without mixing devices. Statistics are accumulated in fp32/fp64 whatever
the model dtype.

Adding a per-head statistic: one method of the collector that records it (``self.attn[layer]["name"] = ...``
or ``self.layers[layer]["name"] = ...``) and one field of `SinkProfile` (see the README's "Adding a statistic").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sinkscope.errors import InputError
from sinkscope.metrics.massive import MassiveTracker

#: Gate values below this count as "closed" (Qwen3-Next style output gates).
GATE_CLOSED = 0.05
#: Neurons per layer reported for the first token's MLP activation.
TOP_NEURONS = 3


class Collector:
    """Base class of the per-family collectors (attributes every collector sets in ``__init__``).

    Attributes:
        model: the measured model.
        n_layers: decoder layers L; ``attention_layers``: the La layers that have attention (indices).
        n_heads, n_kv_heads: H and Hkv.
        max_positions: longest input the model takes (None: unknown); ``context_name`` names that setting.
        vocab_size: size of the input vocabulary (None: unknown).
        provides: the optional `SinkProfile` fields this collector fills (``alpha_proxy``, ``sink_mass``, ...).
        unavailable: field name -> why it holds no measurement for this model.
        attn / layers: the records of the current batch, by layer index.
        tick: called after each attention layer of each batch (the loop's progress counter).
    """

    model: nn.Module
    name: str = ""
    n_layers: int
    attention_layers: list[int]
    n_heads: int
    n_kv_heads: int
    max_positions: int | None = None
    context_name: str = ""
    vocab_size: int | None = None

    def __init__(self) -> None:
        self.provides: set[str] = set()
        self.unavailable: dict[str, str] = {}
        self.attn: dict[int, dict[str, Tensor]] = {}
        self.layers: dict[int, dict[str, Tensor]] = {}
        self.massive = MassiveTracker()
        self.tick: Callable[[], None] = lambda: None
        self.valid: Tensor | None = None  # (B, T) bool, real tokens of the current batch
        self._valid_on: dict[torch.device, Tensor] = {}

    # ---- to override -------------------------------------------------------------------------------------
    @staticmethod
    def accepts(model: nn.Module) -> bool:
        """Whether this collector measures ``model``."""
        raise NotImplementedError

    def model_info(self) -> dict[str, Any]:
        """Architecture facts and provenance recorded with every profile."""
        raise NotImplementedError

    def installed(self) -> contextlib.AbstractContextManager[None]:
        """Context manager that installs the hooks (always removed on exit)."""
        raise NotImplementedError

    def forward(self, ids: Tensor, mask: Tensor) -> None:
        """Run the model on one right-padded batch: ``ids``, ``mask`` (B, T) on the input device."""
        raise NotImplementedError

    # ---- shared ------------------------------------------------------------------------------------------
    @property
    def input_device(self) -> torch.device:
        """Where the model takes its input ids (its first parameter: the embedding, also under a device map)."""
        return next(self.model.parameters()).device

    def check(self, sequences: list[list[int]]) -> None:
        """One-line `InputError` for inputs the model cannot take (too long, ids outside the vocabulary)."""
        longest = max(len(s) for s in sequences)
        if self.max_positions is not None and longest > self.max_positions:
            where = f", {self.context_name}" if self.context_name else ""
            raise InputError(f"input of {longest} tokens is longer than the model's context "
                             f"({self.max_positions}{where})")
        if self.vocab_size is not None:
            bad = [t for s in sequences for t in s if not 0 <= t < self.vocab_size]
            if bad:
                raise InputError(f"token id {bad[0]} out of range for the model's vocab_size={self.vocab_size}")

    def run(self, ids: Tensor, mask: Tensor, rows: np.ndarray) -> None:
        """Clear the records, then run one batch (``rows``: each batch row's sample index)."""
        self.attn, self.layers = {}, {}
        self.valid = mask.bool()
        self._valid_on = {self.valid.device: self.valid}
        self.massive.rows = rows
        self.forward(ids, mask)

    def valid_on(self, device: torch.device) -> Tensor:
        """The current batch's real-token mask ``(B, T)`` on ``device`` (moved once per batch and device)."""
        assert self.valid is not None, "no batch is running"
        if device not in self._valid_on:
            self._valid_on[device] = self.valid.to(device)
        return self._valid_on[device]

    def record_residual(self, layer: int, x: Tensor) -> None:
        """Residual stream after decoder layer ``layer``, ``x (B, T, d_model)``: its norm per token and the
        massive-activation tracker."""
        xf = x.detach().float()
        self.layers.setdefault(layer, {})["residual_norm"] = xf.norm(dim=-1)  # (B, T)
        self.massive.update(layer, xf, self.valid_on(xf.device))

    def record_mlp(self, layer: int, a: Tensor) -> None:
        """MLP hidden activation of ``layer`` (the down projection's input): the first token's top neurons."""
        idx, vals, med = mlp_top_neurons(a, self.valid_on(a.device))
        self.layers.setdefault(layer, {}).update(mlp_top_idx=idx, mlp_top_act=vals, mlp_top_other=med)


def mlp_top_neurons(a: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The first token's largest |MLP hidden activations| and those neurons' median on the other tokens.

    Args:
        a: MLP hidden activation ``(B, T, F)`` (or ``(B*T, F)``), right-padded rows.
        valid: ``(B, T)`` bool, real tokens (on ``a``'s device).
    Returns:
        ``(idx, vals, med)``, each ``(B, TOP_NEURONS)``: neuron indices, |activation| at position 0, median
        |activation| of the same neurons over the row's other real tokens (NaN for one-token rows).
    """
    B, T = valid.shape
    af = a.detach().float().abs().reshape(B, T, -1)  # (B, T, F); OPT flattens to (B*T, F)
    first = af[:, 0]  # right padding: position 0 is each row's first token
    vals, idx = first.topk(min(TOP_NEURONS, af.shape[-1]), dim=-1)  # (B, k)
    other = af[:, 1:].gather(2, idx[:, None, :].expand(-1, af.shape[1] - 1, -1))  # (B, T-1, k)
    med = torch.stack([
        other[b, : int(valid[b, 1:].sum())].median(dim=0).values if valid[b, 1:].any()
        else torch.full_like(vals[b], float("nan")) for b in range(af.shape[0])
    ])
    return idx, vals, med
