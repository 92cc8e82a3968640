"""Device maps that place a model's decoder layers on chosen devices (for accelerate's ``dispatch_model``).

Used to check that per-layer statistics stay on their layer's device when a model spans devices.
"""

from __future__ import annotations

from torch import nn

from sinkscope.models.adapters import get_adapter


def alternating_device_map(model: nn.Module, even: int | str, odd: int | str) -> dict[str, int | str]:
    """A ``device_map``: even decoder layers on ``even``, odd ones on ``odd``, everything outside the layers that
    holds parameters or buffers (embeddings, final norm, head, rotary tables) on ``even``.

    >>> from sinkscope.models.random_hf import tiny_model
    >>> m = alternating_device_map(tiny_model("llama"), 0, "cpu")
    >>> m["model.layers.0"], m["model.layers.1"], m["model.embed_tokens"]
    (0, 'cpu', 0)
    """
    adapter = get_adapter(model)
    layers = [f"{adapter.spec.layers}.{i}" for i in range(adapter.n_layers)]
    device_map: dict[str, int | str] = {name: (even if i % 2 == 0 else odd) for i, name in enumerate(layers)}
    for name, module in model.named_modules():
        inside = any(name == layer or name.startswith(layer + ".") for layer in layers)
        if name and not inside and (list(module.parameters(recurse=False)) or list(module.buffers(recurse=False))):
            device_map[name] = even
    return device_map
