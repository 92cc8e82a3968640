"""The versions recorded with every result: sinkscope's own (the one place it is defined) and its stack's."""

from __future__ import annotations

import platform

__version__ = "0.1.0"


def versions() -> dict[str, str]:
    """Versions of sinkscope, torch, transformers and Python (recorded with every result).

    >>> sorted(versions())
    ['python', 'sinkscope', 'torch', 'transformers']
    """
    import torch
    import transformers

    return {"sinkscope": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}
