"""Forward hooks that are always removed: the one way sinkscope observes or edits a module (never ``forward``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor, nn


def first_tensor(output: Any) -> Tensor:
    """A module's main output: the first element of a tuple/list output, else the output itself."""
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def forward_hooks(hooks: list[tuple[nn.Module, Callable[..., None], bool]]) -> Iterator[None]:
    """Install ``(module, fn, pre)`` hooks; ``fn(tensor)`` gets the module's first output (or input if pre).

    Handles are always removed, even on error.
    """
    handles = []
    try:
        for module, fn, pre in hooks:
            if pre:
                handles.append(module.register_forward_pre_hook(lambda m, args, fn=fn: fn(args[0])))
            else:
                handles.append(module.register_forward_hook(lambda m, args, out, fn=fn: fn(first_tensor(out))))
        yield
    finally:
        for h in handles:
            h.remove()
