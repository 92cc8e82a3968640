"""Ablation of MLP neurons and attention heads at chosen positions (zero or mean), as a context manager.

A neuron is a column of the MLP down projection's input (``act(gate) * up``); a head is its ``d_head`` slice of
the attention output projection's input. Hooks are forward pre-hooks that return a modified input; they are
removed on exit. Positions are indices along the sequence of unpadded (or right-padded) inputs. `ablate_rows`
runs several ablated variants in one forward: each block of batch rows gets its own components ablated.
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


def _targets(model: nn.Module, components: Sequence[Component]) -> list[tuple[nn.Module, Component, slice | int]]:
    """(module whose input holds the component, component, its feature index or slice) for each component."""
    a = get_adapter(model)
    out: list[tuple[nn.Module, Component, slice | int]] = []
    for c in components:
        if not 0 <= c.layer < a.n_layers:
            raise InputError(f"component {c.name}: the model has {a.n_layers} layers")
        if c.kind == "neuron":
            mod = a.mlp_down_module(c.layer)
            if mod is None:
                raise InputError(f"component {c.name}: layer has no dense MLP")
            out.append((mod, c, c.index))
        else:
            if not 0 <= c.index < a.n_heads:
                raise InputError(f"component {c.name}: the model has {a.n_heads} heads")
            out.append((a.output_projection(c.layer), c, slice(c.index * a.d_head, (c.index + 1) * a.d_head)))
    return out


@contextlib.contextmanager
def _ablation_hooks(model: nn.Module, groups: Sequence[Sequence[Component]], rows: int | None, positions: str,
                    mode: str, means: dict[Component, float | Tensor] | None) -> Iterator[None]:
    """Pre-hooks that ablate ``groups[g]`` in rows ``g * rows .. (g + 1) * rows - 1`` (all rows if ``rows`` is
    None, then only one group)."""
    if mode not in ("zero", "mean"):
        raise InputError(f"unknown ablation mode {mode!r}; choose zero or mean")
    if mode == "mean" and means is None:
        raise InputError("mean ablation needs the components' mean activations")
    _position_mask(1, positions, torch.device("cpu"))  # refuse an unknown ``positions`` before any forward
    by_module: dict[nn.Module, list[tuple[Component, slice | int, slice]]] = {}
    for g, comps in enumerate(groups):
        row_slice = slice(None) if rows is None else slice(g * rows, (g + 1) * rows)
        for mod, c, sl in _targets(model, comps):
            by_module.setdefault(mod, []).append((c, sl, row_slice))
    n_rows = None if rows is None else rows * len(groups)

    def make_hook(items: list[tuple[Component, slice | int, slice]]) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0].clone()  # (B, T, F)
            if n_rows is not None and x.shape[0] != n_rows:
                raise InputError(f"batched ablation of {len(groups)} groups x {rows} rows got a batch of "
                                 f"{x.shape[0]} rows")
            pm = _position_mask(x.shape[1], positions, x.device)
            for c, sl, rs in items:
                fill = 0.0 if mode == "zero" else means[c]  # type: ignore[index]
                if isinstance(fill, Tensor):
                    fill = fill.to(x.device, x.dtype)
                x[rs, pm, sl] = fill
            return (x, *args[1:])
        return hook

    handles = [m.register_forward_pre_hook(make_hook(items)) for m, items in by_module.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def ablate(model: nn.Module, components: Sequence[Component], *, positions: str = "first", mode: str = "zero",
           means: dict[Component, float | Tensor] | None = None) -> Iterator[None]:
    """Zero (or set to ``means[c]``) each component's activation at ``positions`` while the block runs.

    Args:
        components: neurons and heads to ablate.
        positions: ``first`` (position 0 only), ``rest`` (all but 0) or ``all``.
        mode: ``zero`` or ``mean`` (needs ``means``: a float per neuron, a (d_head,) tensor per head).
    """
    with _ablation_hooks(model, [list(components)], None, positions, mode, means):
        yield


@contextlib.contextmanager
def ablate_rows(model: nn.Module, groups: Sequence[Sequence[Component]], *, rows: int, positions: str = "first",
                mode: str = "zero", means: dict[Component, float | Tensor] | None = None) -> Iterator[None]:
    """Batched ablation: several ablated variants of the same inputs in one forward, along the batch axis.

    The batch must hold ``len(groups) * rows`` rows: the inputs repeated once per group
    (``ids.repeat(len(groups), 1)``). Rows ``g * rows .. (g + 1) * rows - 1`` run with ``groups[g]`` ablated
    (an empty group is an unablated copy), exactly as `ablate(model, groups[g])` would on those ``rows`` rows.

    Args:
        groups: the components of each variant.
        rows: rows per variant (the batch size of the unrepeated inputs).
        positions, mode, means: as in `ablate`.

    Raises:
        InputError: a forward's batch is not ``len(groups) * rows`` rows, or a bad component/mode/position.
    """
    if rows < 1:
        raise InputError(f"rows per ablated variant must be >= 1, got {rows}")
    with _ablation_hooks(model, groups, rows, positions, mode, means):
        yield
