"""Figures of a long-stream evaluation (`sinkscope.streaming.ppl.StreamEval`): data in, Figure out, no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure


class PolicyResult(Protocol):
    """What the figure reads of one policy's `sinkscope.streaming.ppl.PolicyResult` (read-only: the result is a
    frozen dataclass)."""

    @property
    def positions(self) -> torch.Tensor: ...  # (N,) predicted positions

    @property
    def nll(self) -> torch.Tensor: ...  # (N,) nats

    @property
    def ppl(self) -> float: ...


class StreamEval(Protocol):
    """What the figure reads of a `sinkscope.streaming.ppl.StreamEval` (whose ``save`` draws it; read-only, as
    that result is a frozen dataclass)."""

    @property
    def n_tokens(self) -> int: ...

    @property
    def n_sink(self) -> int: ...

    @property
    def window(self) -> int: ...

    @property
    def policies(self) -> Mapping[str, PolicyResult]: ...


def log_ppl_figure(result: StreamEval, smooth: int = 64) -> Figure:
    """Log-perplexity vs position for each policy (left: running mean over ``smooth`` tokens; right: cumulative
    mean NLL). A dotted line marks where eviction starts."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for name, r in result.policies.items():
        if not len(r.nll):
            continue
        x = r.positions.numpy()
        y = r.nll.double().numpy()
        k = max(1, min(smooth, len(y)))
        run = np.convolve(y, np.ones(k) / k, mode="valid")  # mean of each k consecutive tokens
        ax1.plot(x[k - 1:], run, label=f"{name} (ppl {r.ppl:.1f})", lw=1.2)
        ax2.plot(x, np.cumsum(y) / np.arange(1, len(y) + 1), label=name, lw=1.2)
    for ax in (ax1, ax2):
        ax.axvline(result.n_sink + result.window + 1, color="grey", ls=":", lw=1)
        ax.set_xlabel("position in stream (tokens)")
        ax.grid(alpha=0.3)
    ax1.set_ylabel(f"log-perplexity (mean NLL over last {smooth} tokens, nats)")
    ax2.set_ylabel("cumulative log-perplexity (nats)")
    ax1.legend(fontsize=8)
    fig.suptitle(f"streaming: {result.n_sink} sinks + {result.window} window, {result.n_tokens} tokens")
    return fig
