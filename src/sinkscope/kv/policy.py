"""A per-head KV-cache policy: which kv heads keep every token, and how much the others (sinks + window) keep.

A policy names, per decoder layer, the **kv heads** (GQA: the key/value heads, each shared by ``G`` query heads)
that keep the full cache; every other kv head is a *streaming head* that keeps the first ``n_sink`` tokens and the
last ``window`` tokens. A streaming head's query at position ``t`` sees key ``k`` iff ``k <= t`` and (``k < n_sink``
or ``k >= t - window``): itself plus the ``window`` tokens before it, the same rule as the sink + window cache
(`sinkscope.streaming.banded.band_mask`), so after a step the head stores ``n_sink + window`` tokens.

Bytes. Every kv head stores keys and values of the same size per token, so the stored bytes of a policy after
``T`` tokens, as a fraction of a dense cache's, are

    (n_full * T + n_streaming * min(T, n_sink + window)) / (n_kv_heads_total * T)

(`KVPolicy.bytes_fraction`). A budget ``b`` at the target length fixes the number of full heads
(`n_full_for_budget`); ``b`` below ``(n_sink + window) / T`` (every head streaming) is not reachable.

Files: ``save(dir)`` writes ``policy.json`` (this object) and the same heads in DuoAttention's pattern format
(`sinkscope.kv.duo_format`); ``KVPolicy.load(dir)`` reads ``policy.json`` back.
"""

from __future__ import annotations

import json
import math
import random as _random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sinkscope.errors import InputError
from sinkscope.io import ensure_output_dir, write_json_atomic
from sinkscope.kv import duo_format

POLICY_FILE = "policy.json"
FORMAT = "sinkscope.kv.policy/1"
#: columns of `KVPolicy.head_scores`, per layer and kv head (`sinkscope.kv.mass.head_masses`); policies made
#: from three columns have no drop error; ``ablation`` (a fifth column) is the measured order of a policy ranked by
#: a per-head ablation (`sinkscope.kv.ablate.AblationResult.ranked_policy`)
SCORE_COLUMNS = ("distant", "sink", "window", "drop_error", "ablation")


def n_full_for_budget(budget: float, n_heads: int, n_sink: int, window: int, length: int) -> int:
    """The number of full-cache kv heads (of ``n_heads`` in all) whose stored bytes at ``length`` tokens come
    nearest to ``budget`` (a fraction of the dense cache's bytes).

    >>> n_full_for_budget(0.25, 90, 4, 60, 1024)  # 64 of 1024 tokens per streaming head
    18
    >>> try:
    ...     n_full_for_budget(0.05, 90, 4, 60, 1024)
    ... except InputError as e:
    ...     print(str(e).split(":")[0])
    budget 0.05 is below the streaming floor 0.0625 = (n_sink + window) / length = 64 / 1024
    """
    if not 0 < budget <= 1:
        raise InputError(f"budget must be a fraction of the dense cache's bytes in (0, 1], got {budget}",
                         param="budget")
    kept = min(length, n_sink + window)
    floor = kept / length
    if budget < floor - 1e-9:
        raise InputError(f"budget {budget:g} is below the streaming floor {floor:g} = (n_sink + window) / length = "
                         f"{kept} / {length}: lower the window or the sinks", param="budget")
    if kept >= length:
        return n_heads  # streaming heads would keep everything anyway
    n = (budget - floor) / (1 - floor) * n_heads
    return int(min(n_heads, max(0, math.floor(n + 0.5))))


def window_for_budget(budget: float, n_sink: int, length: int) -> int:
    """The window of a uniform sinks + window cache (every head streaming) whose bytes at ``length`` tokens are
    ``budget`` of the dense cache's: ``round(budget * length) - n_sink`` (>= 1).

    >>> window_for_budget(0.25, 4, 1024)
    252
    """
    w = int(round(budget * length)) - n_sink
    if w < 1:
        raise InputError(f"budget {budget:g} at {length} tokens leaves no window after {n_sink} sinks",
                         param="budget")
    return w


def model_card(model: Any) -> dict[str, Any]:
    """What a policy records about its model: name, source (with the resolved revision of hub models), type and
    the cache's shape (layers, kv heads, head dim, dtype)."""
    from sinkscope.models.adapters import get_adapter

    a = get_adapter(model)
    src = getattr(model, "sinkscope_source", None)
    source = src.to_json() if src is not None else {"kind": "object"}
    name = getattr(model.config, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    dtype = str(getattr(model, "dtype", "")).replace("torch.", "")
    return {"name": name, "source": source, "revision": source.get("revision"), "model_type": a.model_type,
            "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads, "d_head": a.d_head,
            "dtype": dtype}


def _card(model: Any) -> dict[str, Any]:
    return dict(model) if isinstance(model, dict) else model_card(model)


@dataclass(frozen=True)
class KVPolicy:
    """Which kv heads keep the full cache; the others keep ``n_sink`` sinks + the last ``window`` tokens.

    Attributes:
        full_heads: per layer, the kv heads (indices in ``0..n_kv_heads-1``) that keep every token.
        n_layers, n_kv_heads: the model's decoder layers and kv heads per layer.
        n_sink: first tokens every streaming head keeps.
        window: most recent tokens (before the query) every streaming head keeps.
        target_length: the length (tokens) the policy was calibrated for and its budget refers to.
        budget: the stored bytes as a fraction of the dense cache's at ``target_length`` (`bytes_fraction`).
        measured_kl: mean next-token KL(dense || policy) in nats/token on held-back calibration text, or None.
        model: the model card (`model_card`): name, source with resolved revision, shapes.
        calibration_sha256: SHA-256 of the calibration text (None: not calibrated).
        head_scores: per layer and kv head, (distant, sink, window) attention mass at the calibration length,
            each summed over the kv head's query heads (so the three add up to G) and averaged over queries, then
            the drop error (`sinkscope.kv.mass.head_masses`); None for policies made without a measurement.
        kind: ``"calibrated"``, ``"uniform"``, ``"random"`` or ``"manual"``.
        info: anything else worth keeping (requested budget, selection criterion, the KL of each budget tried).
    """

    full_heads: tuple[tuple[int, ...], ...]
    n_layers: int
    n_kv_heads: int
    n_sink: int
    window: int
    target_length: int
    budget: float = float("nan")
    measured_kl: float | None = None
    model: dict[str, Any] = field(default_factory=dict)
    calibration_sha256: str | None = None
    head_scores: tuple[tuple[tuple[float, ...], ...], ...] | None = None
    kind: str = "manual"
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_sink < 0 or self.window < 1:
            raise InputError(f"need n_sink >= 0 and window >= 1, got n_sink={self.n_sink}, window={self.window}")
        if self.target_length < 1:
            raise InputError(f"target_length must be positive, got {self.target_length}", param="target_length")
        if len(self.full_heads) != self.n_layers:
            raise InputError(f"full_heads lists {len(self.full_heads)} layers, the policy has {self.n_layers}")
        heads = tuple(tuple(sorted({int(h) for h in hs})) for hs in self.full_heads)
        for layer, hs in enumerate(heads):
            if any(h < 0 or h >= self.n_kv_heads for h in hs):
                raise InputError(f"layer {layer}: kv head indices {hs} outside 0..{self.n_kv_heads - 1}")
        object.__setattr__(self, "full_heads", heads)
        if math.isnan(self.budget):
            object.__setattr__(self, "budget", self.bytes_fraction(self.target_length))

    # ---- derived ---------------------------------------------------------------------------------------------
    @property
    def n_full(self) -> int:
        """Full-cache kv heads over all layers."""
        return sum(len(h) for h in self.full_heads)

    @property
    def n_heads_total(self) -> int:
        return self.n_layers * self.n_kv_heads

    def full_matrix(self) -> np.ndarray:
        """(L, Hkv) bool: True where the kv head keeps the full cache."""
        return duo_format.full_matrix(self.full_heads, self.n_kv_heads)

    def streaming_heads(self, layer: int) -> tuple[int, ...]:
        full = set(self.full_heads[layer])
        return tuple(h for h in range(self.n_kv_heads) if h not in full)

    def bytes_fraction(self, length: int) -> float:
        """Stored KV bytes after ``length`` tokens as a fraction of a dense cache's.

        >>> p = KVPolicy(((0,), ()), n_layers=2, n_kv_heads=2, n_sink=4, window=12, target_length=64)
        >>> p.bytes_fraction(64)  # (64 + 3 * 16) / (4 * 64)
        0.4375
        """
        if length < 1:
            raise InputError(f"length must be positive, got {length}")
        kept = min(length, self.n_sink + self.window)
        n = self.n_full
        return (n * length + (self.n_heads_total - n) * kept) / (self.n_heads_total * length)

    def scores_array(self) -> np.ndarray | None:
        """`head_scores` as an (L, Hkv, C) array (columns the first C of `SCORE_COLUMNS`), or None."""
        return None if self.head_scores is None else np.asarray(self.head_scores, dtype=float)

    def check_model(self, model: Any) -> None:
        """InputError (one line) if ``model``'s cache shape differs from the policy's."""
        from sinkscope.models.adapters import get_adapter

        a = get_adapter(model)
        if (a.n_layers, a.n_kv_heads) != (self.n_layers, self.n_kv_heads):
            raise InputError(f"the policy is for {self.n_layers} layers x {self.n_kv_heads} kv heads "
                             f"({self.model.get('name') or 'unknown model'}); this model has {a.n_layers} x "
                             f"{a.n_kv_heads}")

    #: `window_for_budget` (the uniform baseline's window at equal bytes), also reachable from the class
    window_for_budget = staticmethod(window_for_budget)

    # ---- constructors ----------------------------------------------------------------------------------------
    @classmethod
    def uniform(cls, model: Any, n_sink: int, window: int, target_length: int) -> KVPolicy:
        """No full heads: every kv head keeps sinks + window (StreamingLLM with absolute positions)."""
        card = _card(model)
        L, H = int(card["n_layers"]), int(card["n_kv_heads"])
        return cls(tuple(() for _ in range(L)), L, H, n_sink, window, target_length, model=card, kind="uniform")

    @classmethod
    def random(cls, model: Any, budget: float, n_sink: int, window: int, target_length: int, seed: int = 0
               ) -> KVPolicy:
        """The control: as many full heads as ``budget`` buys, chosen uniformly at random (``seed``)."""
        card = _card(model)
        L, H = int(card["n_layers"]), int(card["n_kv_heads"])
        n = n_full_for_budget(budget, L * H, n_sink, window, target_length)
        chosen = _random.Random(seed).sample(range(L * H), n)
        full = np.zeros((L, H), dtype=bool)
        full.ravel()[chosen] = True
        return cls(duo_format.heads_per_layer(full), L, H, n_sink, window, target_length, model=card, kind="random",
                   info={"requested_budget": budget, "seed": seed})

    @classmethod
    def from_scores(cls, scores: np.ndarray, budget: float, n_sink: int, window: int, target_length: int, *,
                    model: Any = None, criterion: str | None = None, **kwargs: Any) -> KVPolicy:
        """The ``n_full_for_budget`` kv heads with the highest ``criterion`` score keep the full cache.

        Args:
            scores: (L, Hkv, C) measurements (columns `SCORE_COLUMNS`) or (L, Hkv) ranking scores.
            budget: fraction of the dense cache's bytes at ``target_length``.
            model: a model or model card (default: shapes from ``scores``).
            criterion: the column of ``scores`` that ranks the heads (`SCORE_COLUMNS`; default ``"drop_error"``
                when the scores have it, else ``"distant"``); recorded in ``info``.
            kwargs: other `KVPolicy` fields (``measured_kl``, ``calibration_sha256``, ``kind``, ``info``).
        """
        scores = np.asarray(scores, dtype=float)
        if scores.ndim == 3:
            if criterion is None:
                criterion = "drop_error" if scores.shape[-1] > SCORE_COLUMNS.index("drop_error") else "distant"
            if criterion not in SCORE_COLUMNS[:scores.shape[-1]]:
                raise InputError(f"unknown ranking criterion {criterion!r}; the scores have "
                                 f"{', '.join(SCORE_COLUMNS[:scores.shape[-1]])}", param="criterion")
            rank = scores[..., SCORE_COLUMNS.index(criterion)]
        else:
            rank, criterion = scores, criterion or "score"
        L, H = rank.shape
        card = _card(model) if model is not None else {"n_layers": L, "n_kv_heads": H}
        n = n_full_for_budget(budget, L * H, n_sink, window, target_length)
        full = np.zeros((L, H), dtype=bool)
        flat = np.arange(L * H)
        order = flat[np.lexsort((flat, -rank.ravel()))]  # highest score first, ties by position
        full.ravel()[order[:n]] = True
        head_scores = (tuple(tuple(tuple(float(x) for x in s) for s in row) for row in scores)
                       if scores.ndim == 3 else None)
        info = {"requested_budget": budget, "criterion_column": criterion, **kwargs.pop("info", {})}
        return cls(duo_format.heads_per_layer(full), L, H, n_sink, window, target_length, model=card,
                   head_scores=head_scores, kind=kwargs.pop("kind", "calibrated"), info=info, **kwargs)

    @classmethod
    def from_duo(cls, directory: str | Path, target_length: int, *, threshold: float | None = None,
                 sparsity: float | None = None, model: Any = None) -> KVPolicy:
        """A policy from a DuoAttention pattern directory (``full_attention_heads.tsv`` + ``config.json``), e.g. one
        of DuoAttention's published patterns, so it runs with the head-wise cache's real savings.

        Full heads: gate ``>= threshold`` (DuoAttention's rule; default 0.5), or with ``sparsity`` the
        ``sparsity``-quantile of the gates as the threshold (DuoAttention's ``sparsify_attention_heads`` without its
        tie-breaking noise). ``n_sink`` / ``window`` = ``sink_size`` / ``recent_size``.
        """
        if threshold is not None and sparsity is not None:
            raise InputError("give threshold or sparsity, not both")
        gates, sink, recent = duo_format.read_gates(directory)
        if sparsity is not None:
            t = 2.0 if sparsity >= 1 else (-1.0 if sparsity <= 0 else float(np.quantile(gates, sparsity)))
        else:
            t = duo_format.THRESHOLD if threshold is None else threshold
        full = duo_format.full_heads_by_threshold(gates, t)
        L, H = gates.shape
        card = _card(model) if model is not None else {"n_layers": L, "n_kv_heads": H}
        return cls(duo_format.heads_per_layer(full), L, H, sink, recent, target_length, model=card, kind="duo",
                   info={"duo_pattern": str(directory), "threshold": t})

    def with_fields(self, **changes: Any) -> KVPolicy:
        data = {**{f: getattr(self, f) for f in self.__dataclass_fields__}, **changes}
        if "full_heads" in changes and "budget" not in changes:
            data["budget"] = float("nan")
        return KVPolicy(**data)

    # ---- files -----------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["full_heads"] = [list(h) for h in self.full_heads]
        d["head_scores"] = None if self.head_scores is None else [[list(s) for s in row] for row in self.head_scores]
        d["head_score_columns"] = (list(SCORE_COLUMNS) if self.head_scores is None
                                   else list(SCORE_COLUMNS[:len(self.head_scores[0][0])]))
        d["n_full"] = self.n_full
        return {"format": FORMAT, **d}

    def save(self, directory: str | Path) -> Path:
        """Write ``policy.json`` and the DuoAttention pattern (``full_attention_heads.tsv``, ``config.json``)."""
        d = ensure_output_dir(directory)
        scores = self.scores_array()
        criterion = self.info.get("criterion_column", "distant")
        column = SCORE_COLUMNS.index(criterion) if criterion in SCORE_COLUMNS else 0
        duo_format.write_pattern(d, self.full_matrix(), n_sink=self.n_sink, window=self.window,
                                 scores=None if scores is None or column >= scores.shape[-1] else scores[..., column],
                                 extra={"model": self.model.get("name"), "target_length": self.target_length})
        write_json_atomic(d / POLICY_FILE, self.to_json())
        return d

    @classmethod
    def load(cls, directory: str | Path) -> KVPolicy:
        """Read ``DIR/policy.json`` (or that file itself); one-line `InputError` on a missing or garbled file."""
        p = Path(directory)
        path = p if p.is_file() else p / POLICY_FILE
        if not path.is_file():
            raise InputError(f"no KV policy at {directory}: {path} not found (write one with sinkscope kv calibrate)")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise InputError(f"{path} is not valid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise InputError(f"{path} is not a sinkscope KV policy (format {FORMAT!r} expected)")
        try:
            scores = d.get("head_scores")
            return cls(
                full_heads=tuple(tuple(int(h) for h in hs) for hs in d["full_heads"]),
                n_layers=int(d["n_layers"]), n_kv_heads=int(d["n_kv_heads"]), n_sink=int(d["n_sink"]),
                window=int(d["window"]), target_length=int(d["target_length"]),
                budget=float(d["budget"]) if d.get("budget") is not None else float("nan"),
                measured_kl=None if d.get("measured_kl") is None else float(d["measured_kl"]),
                model=dict(d.get("model") or {}), calibration_sha256=d.get("calibration_sha256"),
                head_scores=None if scores is None else tuple(tuple(tuple(float(x) for x in s) for s in row)
                                                              for row in scores),
                kind=str(d.get("kind", "manual")), info=dict(d.get("info") or {}))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{path} is a garbled KV policy ({type(e).__name__}: {e})") from None
