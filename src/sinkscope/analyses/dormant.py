"""Active vs dormant heads across input domains (Guo et al. 2410.13835, Sec. 4): per head and domain, the
attention mass on the sink (token 0) and the head's output norm; heads whose sink mass changes with the domain
are *domain-switching*.

A head is *dormant* on a domain when its mean attention on token 0, ``alpha_0`` (Gu et al.'s per-head sink
score, see `SinkProfile.alpha`), is at least ``threshold``: it then parks its attention on a token whose value
is small and writes almost nothing. It is *active* otherwise. The *dependence* of a head on the domain is the
range of its ``alpha_0`` over the domains (0 = same behaviour everywhere, 1 = all-sink on one domain and
no sink on another).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from sinkscope.errors import InputError
from sinkscope.inputs import TokenBatch
from sinkscope.models.adapters import get_adapter
from sinkscope.profile import SinkProfile, profile_sinks

#: Default domains compared by `find_dormant_heads`.
DEFAULT_DOMAINS: tuple[str, ...] = ("text", "code", "random")
#: alpha_0 at or above this makes a head dormant on a domain.
DORMANT_THRESHOLD = 0.5


@dataclass
class DormancyReport:
    """Per-head attention on the first token (alpha_0) and output norm on several input domains.

    Shapes (D domains, La attention layers, H heads):
        alpha0: (D, La, H) mean alpha_0 (attention on token 0, averaged over queries and samples).
        out_norm: (D, La, H) mean ||head output|| (before W_O), averaged over queries and samples.
    """

    domains: list[str]
    attention_layers: list[int]
    alpha0: np.ndarray
    out_norm: np.ndarray
    threshold: float = DORMANT_THRESHOLD
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    profiles: dict[str, SinkProfile] = field(default_factory=dict, repr=False)

    def dormant(self) -> np.ndarray:
        """(D, La, H) bool: the head is dormant on the domain (alpha_0 >= threshold)."""
        return np.nan_to_num(self.alpha0, nan=0.0) >= self.threshold

    def dependence(self) -> np.ndarray:
        """(La, H) range of alpha_0 over the domains (max - min), in [0, 1]."""
        return np.nanmax(self.alpha0, axis=0) - np.nanmin(self.alpha0, axis=0)

    def out_norm_ratio(self) -> np.ndarray:
        """(La, H) largest over smallest output norm across domains (>= 1; large = the head switches on)."""
        lo = np.maximum(np.nanmin(self.out_norm, axis=0), 1e-12)
        return np.nanmax(self.out_norm, axis=0) / lo

    def classify(self) -> np.ndarray:
        """(La, H) str: ``dormant`` (on every domain), ``active`` (on none) or ``switching``."""
        d = self.dormant()
        out = np.full(d.shape[1:], "switching", dtype=object)
        out[d.all(axis=0)] = "dormant"
        out[(~d).all(axis=0)] = "active"
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One row per head, most domain-dependent first: layer, head, class, dependence, where it is most and
        least dormant, out-norm ratio, then ``alpha0_<domain>`` and ``out_norm_<domain>`` for each domain."""
        dep, cls, ratio = self.dependence(), self.classify(), self.out_norm_ratio()
        rows = []
        for li, layer in enumerate(self.attention_layers):
            for h in range(self.alpha0.shape[2]):
                s = self.alpha0[:, li, h]
                row: dict[str, Any] = {
                    "layer": layer, "head": h, "class": str(cls[li, h]), "dependence": float(dep[li, h]),
                    "most_dormant_on": self.domains[int(np.nanargmax(s))],
                    "most_active_on": self.domains[int(np.nanargmin(s))],
                    "out_norm_ratio": float(ratio[li, h]),
                }
                for d, name in enumerate(self.domains):
                    row[f"alpha0_{name}"] = float(s[d])
                for d, name in enumerate(self.domains):
                    row[f"out_norm_{name}"] = float(self.out_norm[d, li, h])
                rows.append(row)
        rows.sort(key=lambda r: (-round(r["dependence"], 9), r["layer"], r["head"]))
        return rows

    def switching_heads(self, n: int = 10) -> list[dict[str, Any]]:
        """The ``n`` most domain-dependent heads that are dormant on some domain and active on another."""
        return [r for r in self.rows() if r["class"] == "switching"][:n]

    def summary(self) -> dict[str, Any]:
        """Counts of dormant/active/switching heads and per-domain averages."""
        cls = self.classify()
        dormant = self.dormant()
        dep = self.dependence()
        top = self.rows()[0]
        return {
            "threshold": self.threshold,
            "n_heads": int(cls.size),
            "n_dormant": int((cls == "dormant").sum()),
            "n_active": int((cls == "active").sum()),
            "n_switching": int((cls == "switching").sum()),
            "dormant_share": {n: float(dormant[d].mean()) for d, n in enumerate(self.domains)},
            "mean_alpha0": {n: float(np.nanmean(self.alpha0[d])) for d, n in enumerate(self.domains)},
            "mean_dependence": float(np.nanmean(dep)),
            "most_dependent": {k: top[k] for k in ("layer", "head", "dependence", "most_dormant_on",
                                                   "most_active_on")},
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "domains": self.domains, "attention_layers": self.attention_layers, "threshold": self.threshold,
            "inputs": self.inputs, "summary": self.summary(),
            "alpha0": self.alpha0.tolist(), "out_norm": self.out_norm.tolist(),
        }


def dormancy_from_profiles(profiles: Mapping[str, SinkProfile], *, threshold: float = DORMANT_THRESHOLD
                           ) -> DormancyReport:
    """Build a `DormancyReport` from one `SinkProfile` per domain (same model).

    Raises:
        InputError: fewer than two domains, or profiles of different models.
    """
    if len(profiles) < 2:
        raise InputError(f"comparing domains needs at least two, got {len(profiles)}")
    if not 0 < threshold < 1:
        raise InputError(f"dormancy threshold must be in (0, 1), got {threshold}")
    names = list(profiles)
    shapes = {profiles[n].alpha.shape[1:3] for n in names}
    if len(shapes) != 1:
        raise InputError(f"profiles of different models: head grids {sorted(shapes)}")
    first = profiles[names[0]]
    sink = np.stack([profiles[n].alpha_mean(0) for n in names])  # (D, La, H)
    out = np.stack([np.nanmean(profiles[n].out_norm, axis=0) for n in names])  # (D, La, H)
    return DormancyReport(domains=names, attention_layers=list(first.attention_layers), alpha0=sink,
                          out_norm=out, threshold=threshold, inputs={n: profiles[n].inputs for n in names},
                          profiles=dict(profiles))


def find_dormant_heads(
    model: nn.Module,
    tokenizer: Any,
    domains: Mapping[str, TokenBatch | Sequence[str]] | Sequence[str] = DEFAULT_DOMAINS,
    *,
    threshold: float = DORMANT_THRESHOLD,
    n_tokens: int = 64,
    samples: int = 8,
    batch_size: int = 8,
    profiles: Mapping[str, SinkProfile] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DormancyReport:
    """Profile the model on each input domain and compare every head's attention on token 0 across them.

    Args:
        model: a loaded causal LM of a supported architecture.
        tokenizer: its tokenizer.
        domains: names of built-in domains (see `sinkscope.domains`: ``text``, ``code``, ``random``,
            ``repeat``), or a mapping name -> `TokenBatch` or list of texts.
        threshold: alpha_0 at or above which a head counts as dormant on a domain.
        n_tokens, samples: size of the built-in domains (tokens per sample, samples).
        batch_size: samples per forward pass.
        profiles: already computed profiles to reuse, by domain name.
        progress: ``progress(done, total)`` over all domains' attention layers.

    Returns:
        A `DormancyReport` (rows sorted by how much the head depends on the domain).

    Shapes:
        report.alpha0, report.out_norm: (D, La, H).

    Raises:
        InputError: fewer than two domains, an unknown domain name, or empty inputs.
    """
    from sinkscope.domains import domain_batch
    from sinkscope.inputs import text_inputs

    items: list[tuple[str, TokenBatch | Sequence[str] | None]]  # None: a built-in domain, by name
    if isinstance(domains, Mapping):
        items = list(domains.items())
    else:
        items = [(str(n), None) for n in domains]
    if len(items) < 2:
        raise InputError(f"comparing domains needs at least two, got {len(items)}")
    done: dict[str, SinkProfile] = dict(profiles or {})
    batches: dict[str, TokenBatch] = {}
    for name, spec in items:
        if name in done:
            continue
        if spec is None:
            batches[name] = domain_batch(tokenizer, name, n_tokens=n_tokens, samples=samples)
        elif isinstance(spec, TokenBatch):
            batches[name] = spec
        else:
            batches[name] = text_inputs(tokenizer, list(spec), max_tokens=n_tokens, kind=name)
    n_layers = len(get_adapter(model).attention_layers)
    total = sum(-(-len(b.sequences) // batch_size) for b in batches.values()) * n_layers
    start = 0
    for name, batch in batches.items():
        report = (lambda d, _t, _w="", s=start: progress(s + d, total)) if progress is not None else None
        done[name] = profile_sinks(model, batch, batch_size=batch_size, progress=report)
        start += -(-len(batch.sequences) // batch_size) * n_layers
    return dormancy_from_profiles({name: done[name] for name, _ in items}, threshold=threshold)
