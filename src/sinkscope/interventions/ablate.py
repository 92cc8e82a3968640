"""Ablation of MLP neurons and attention heads at chosen positions (zero or mean), as a context manager.

A neuron is a column of the MLP down projection's input (``act(gate) * up``); a head is its ``d_head`` slice of
the attention output projection's input. Hooks are forward pre-hooks that return a modified input; they are
removed on exit. Positions are indices along the sequence of unpadded (or right-padded) inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sinkscope.errors import InputError
from sinkscope.models.adapters import get_adapter

KINDS = ("neuron", "head")
POSITIONS = ("first", "rest", "all")


@dataclass(frozen=True)
class Component:
    """One circuit component: ``kind`` ``neuron`` (MLP down-projection input column) or ``head``."""

    layer: int
    kind: str
    index: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"unknown component kind {self.kind!r}; choose neuron or head")

    @property
    def name(self) -> str:
        return f"L{self.layer}.{'N' if self.kind == 'neuron' else 'H'}{self.index}"


def _position_mask(T: int, positions: str, device: torch.device) -> Tensor:
    if positions not in POSITIONS:
        raise InputError(f"unknown ablation positions {positions!r}; choose one of {', '.join(POSITIONS)}")
    m = torch.ones(T, dtype=torch.bool, device=device)
    if positions == "first":
        m[1:] = False
    elif positions == "rest":
        m[0] = False
    return m


@contextlib.contextmanager
def ablate(model: nn.Module, components: Sequence[Component], *, positions: str = "first", mode: str = "zero",
           means: dict[Component, float | Tensor] | None = None) -> Iterator[None]:
    """Zero (or set to ``means[c]``) each component's activation at ``positions`` while the block runs.

    Args:
        components: neurons and heads to ablate.
        positions: ``first`` (position 0 only), ``rest`` (all but 0) or ``all``.
        mode: ``zero`` or ``mean`` (needs ``means``: a float per neuron, a (d_head,) tensor per head).
    """
    if mode not in ("zero", "mean"):
        raise InputError(f"unknown ablation mode {mode!r}; choose zero or mean")
    if mode == "mean" and means is None:
        raise InputError("mean ablation needs the components' mean activations")
    a = get_adapter(model)
    by_module: dict[nn.Module, list[tuple[Component, slice | int]]] = {}
    for c in components:
        if not 0 <= c.layer < a.n_layers:
            raise InputError(f"component {c.name}: the model has {a.n_layers} layers")
        if c.kind == "neuron":
            mod = a.mlp_down_module(c.layer)
            if mod is None:
                raise InputError(f"component {c.name}: layer has no dense MLP")
            by_module.setdefault(mod, []).append((c, c.index))
        else:
            if not 0 <= c.index < a.n_heads:
                raise InputError(f"component {c.name}: the model has {a.n_heads} heads")
            mod = a.output_projection(c.layer)
            by_module.setdefault(mod, []).append((c, slice(c.index * a.d_head, (c.index + 1) * a.d_head)))

    def make_hook(items: list[tuple[Component, slice | int]]) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0].clone()  # (B, T, F)
            pm = _position_mask(x.shape[1], positions, x.device)
            for c, sl in items:
                fill = 0.0 if mode == "zero" else means[c]  # type: ignore[index]
                if isinstance(fill, Tensor):
                    fill = fill.to(x.device, x.dtype)
                x[:, pm, sl] = fill
            return (x, *args[1:])
        return hook

    handles = [m.register_forward_pre_hook(make_hook(items)) for m, items in by_module.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
