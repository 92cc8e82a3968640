"""The sink profiler: one pass over a batch of token sequences, all extreme-token metrics, linear memory.

`profile_sinks` runs the model with its attention routed through `sinkscope.capture` (column statistics in
query chunks, one layer at a time) and hooks on decoder layers, MLP down projections and gated q projections.
It returns a `SinkProfile` holding per-sample arrays (no T x T matrix) and the derived summaries.
"""

from __future__ import annotations

import platform
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sinkscope.capture import forward_hooks, observe_attention
from sinkscope.errors import InputError
from sinkscope.inputs import TokenBatch
from sinkscope.metrics.attention_stats import DEFAULT_CHUNK_BYTES, attention_with_stats
from sinkscope.metrics.massive import MassiveTracker
from sinkscope.models.adapters import ModelAdapter, get_adapter

#: Gate values below this count as "closed" (Qwen3-Next style output gates).
GATE_CLOSED = 0.05
#: Neurons per layer reported for the first token's MLP activation.
TOP_NEURONS = 3


@dataclass
class SinkProfile:
    """Extreme-token measurements of one model on one `TokenBatch`.

    Shapes (N samples, La attention layers, L layers, H heads, Hkv kv heads, T = longest sample; NaN past a
    sample's length):
        alpha: (N, La, H, T) mean attention key k receives from the real queries that see it (Gu et al.).
        sink_mass: (N, La, H) mean attention on a learned sink logit (virtual key), or None.
        value_norm: (N, La, Hkv, T) ||v_k||.
        residual_norm: (N, L, T) ||x[l, t]|| after each decoder layer.
        cos_first / cos_other: (N, La, H) mean cos(q_t, k_first) and mean cos(q_t, k_j != first).
        out_norm: (N, La, H) mean ||head output|| (before W_O).
        mlp_top_idx / mlp_top_act: (N, L, TOP_NEURONS) the first token's largest |MLP activations|.
        mlp_top_other: (N, L, TOP_NEURONS) median |activation| of those neurons on the other tokens.
        gate_mean / gate_closed: (N, La, H) output-gate mean and share below GATE_CLOSED, or None.
        alpha_proxy: (N, La, H, T) alpha from Gu et al.'s row-normalised proxy ``|w| / sum |w|`` (rows over real
            keys plus the sink slot), or None. Set for models whose attention rows need not sum to one
            (tinygpt's sigmoid, relu, elu1, softmax + 1 and bias slots); ``alpha`` then holds the weights used.
        sink_mass_proxy: (N, La, H) the sink slot's share of the row-normalised proxy, or None.
        unavailable: field name -> why it holds no measurement for this model (NaN / -1 there).
    """

    model: dict[str, Any]
    inputs: dict[str, Any]
    attention_layers: list[int]
    lengths: np.ndarray
    alpha: np.ndarray
    value_norm: np.ndarray
    residual_norm: np.ndarray
    cos_first: np.ndarray
    cos_other: np.ndarray
    out_norm: np.ndarray
    mlp_top_idx: np.ndarray
    mlp_top_act: np.ndarray
    mlp_top_other: np.ndarray
    massive: list[dict[str, Any]]
    sink_mass: np.ndarray | None = None
    gate_mean: np.ndarray | None = None
    gate_closed: np.ndarray | None = None
    eps: float = 0.3
    timing: dict[str, float] = field(default_factory=dict)
    alpha_proxy: np.ndarray | None = None
    sink_mass_proxy: np.ndarray | None = None
    unavailable: dict[str, str] = field(default_factory=dict)

    # ---- sinks -------------------------------------------------------------------------------------------
    def alpha_of(self, proxy: bool = False) -> np.ndarray:
        """(N, La, H, T) alpha from the weights used, or (``proxy``) from the row-normalised proxy."""
        if not proxy:
            return self.alpha
        if self.alpha_proxy is None:
            raise InputError("this profile has no row-normalised proxy (its attention rows sum to one: use alpha)")
        return self.alpha_proxy

    def head_is_sink(self, k: int = 0, eps: float | None = None, *, proxy: bool = False) -> np.ndarray:
        """(N, La, H) bool: alpha_k > eps (False where the sample is shorter than k + 1)."""
        e = self.eps if eps is None else eps
        a = self.alpha_of(proxy)[..., k]
        return np.nan_to_num(a, nan=-1.0) > e

    def sink_ratio(self, k: int = 0, eps: float | None = None, *, proxy: bool = False) -> float:
        """``Sink_k^eps``: share of heads whose alpha_k exceeds eps, averaged over the samples (Gu et al.);
        ``proxy``: from the row-normalised proxy (Gu et al.'s * numbers for non-softmax attention)."""
        valid = self.lengths > k
        if not valid.any():
            raise InputError(f"no sample is longer than position {k}")
        return float(self.head_is_sink(k, eps, proxy=proxy)[valid].mean())

    def slot_sink_ratio(self, eps: float | None = None, *, proxy: bool = False) -> float:
        """Gu et al.'s ``Sink_*``: share of heads (and samples) whose sink-slot mass exceeds eps."""
        mass = self.sink_mass_proxy if proxy else self.sink_mass
        if mass is None:
            raise InputError("this model has no sink slot (learned sink, key bias, sink token or softmax + 1)")
        e = self.eps if eps is None else eps
        return float((np.nan_to_num(mass, nan=-1.0) > e).mean())

    def sink_ratio_by_position(self, eps: float | None = None, *, proxy: bool = False) -> np.ndarray:
        """(T_min,) ``Sink_k^eps`` for every key position present in all samples."""
        t = int(self.lengths.min())
        e = self.eps if eps is None else eps
        return (np.nan_to_num(self.alpha_of(proxy)[..., :t], nan=-1.0) > e).mean(axis=(0, 1, 2))

    def top_sinks(self, n: int = 5, eps: float | None = None) -> list[dict[str, float]]:
        """The ``n`` key positions with the highest sink ratio (position 0 included)."""
        r = self.sink_ratio_by_position(eps)
        order = np.argsort(-r, kind="stable")[:n]
        return [{"position": int(k), "sink_ratio": float(r[k])} for k in order]

    def head_sink_rate(self, k: int = 0, eps: float | None = None, *, proxy: bool = False) -> np.ndarray:
        """(La, H) share of samples in which the head sinks on position k."""
        valid = self.lengths > k
        return self.head_is_sink(k, eps, proxy=proxy)[valid].mean(axis=0)

    def alpha_mean(self, k: int = 0, *, proxy: bool = False) -> np.ndarray:
        """(La, H) alpha_k averaged over the samples."""
        return np.nanmean(self.alpha_of(proxy)[self.lengths > k][..., k], axis=0)

    # ---- norms -------------------------------------------------------------------------------------------
    @staticmethod
    def _first_vs_median(x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """x: (N, ..., T) -> (...,): mean over samples of x[..., 0] / median(x[..., 1:len])."""
        out = []
        for i, n in enumerate(lengths):
            if n < 2:
                continue
            med = np.median(x[i, ..., 1:n], axis=-1)
            out.append(x[i, ..., 0] / np.maximum(med, 1e-30))
        if not out:
            return np.full(x.shape[1:-1], np.nan)
        return np.mean(out, axis=0)

    def residual_norm_median_other(self) -> np.ndarray:
        """(L,) per layer, the median residual norm over each sample's non-first tokens, averaged over samples
        (NaN when no sample has a second token)."""
        L = self.residual_norm.shape[1]
        if not (self.lengths > 1).any():
            return np.full(L, np.nan)
        return np.array([np.nanmean([np.median(self.residual_norm[i, l, 1:n])
                                     for i, n in enumerate(self.lengths) if n > 1]) for l in range(L)])

    def residual_ratio(self) -> np.ndarray:
        """(L,) the first token's residual norm over the median other token's, per layer."""
        return self._first_vs_median(self.residual_norm, self.lengths)

    def value_ratio(self) -> np.ndarray:
        """(La, Hkv) the first token's value norm over the median other token's (small = value drain)."""
        return self._first_vs_median(self.value_norm, self.lengths)

    # ---- export ------------------------------------------------------------------------------------------
    def heads_rows(self) -> list[dict[str, Any]]:
        """One row per (layer, head) for ``heads.csv``."""
        rate = self.head_sink_rate(0)
        a0 = self.alpha_mean(0)
        a0p = self.alpha_mean(0, proxy=True) if self.alpha_proxy is not None else None
        vr = self.value_ratio()
        H = self.alpha.shape[2]
        groups = H // vr.shape[1]
        rows = []
        for li, layer in enumerate(self.attention_layers):
            for h in range(H):
                row = {
                    "layer": layer, "head": h, "alpha_0": float(a0[li, h]), "sink_rate_0": float(rate[li, h]),
                    "value_ratio_0": float(vr[li, h // groups]),
                    "cos_q_first": float(np.nanmean(self.cos_first[:, li, h])),
                    "cos_q_other": float(np.nanmean(self.cos_other[:, li, h])),
                    "out_norm": float(np.nanmean(self.out_norm[:, li, h])),
                }
                if self.alpha_proxy is not None:
                    row["alpha_0_proxy"] = float(a0p[li, h])
                if self.sink_mass is not None:
                    row["learned_sink_mass"] = float(np.nanmean(self.sink_mass[:, li, h]))
                if self.sink_mass_proxy is not None:
                    row["learned_sink_mass_proxy"] = float(np.nanmean(self.sink_mass_proxy[:, li, h]))
                if self.gate_mean is not None and self.gate_closed is not None:
                    row["gate_mean"] = float(np.nanmean(self.gate_mean[:, li, h]))
                    row["gate_closed"] = float(np.nanmean(self.gate_closed[:, li, h]))
                rows.append(row)
        return rows

    def summary(self) -> dict[str, Any]:
        """Scalar and per-layer summaries (what ``profile.json`` holds besides the raw arrays)."""
        with warnings.catch_warnings():  # one-token samples have no "other" tokens: NaN, not a warning
            warnings.simplefilter("ignore", RuntimeWarning)
            return self._summary()

    def _summary(self) -> dict[str, Any]:
        rr = self.residual_ratio()
        out: dict[str, Any] = {
            "sink_ratio": self.sink_ratio(0),
            "eps": self.eps,
            "top_sinks": self.top_sinks(),
            "sink_ratio_by_position": self.sink_ratio_by_position().tolist()[:256],
            "attention_on_first_by_layer": np.nanmean(self.alpha_mean(0), axis=1).tolist(),
            "sink_ratio_first_by_layer": self.head_is_sink(0)[self.lengths > 0].mean(axis=(0, 2)).tolist(),
            "residual_ratio_first_by_layer": rr.tolist(),
            "residual_peak": ({"layer": int(np.nanargmax(rr)), "ratio": float(np.nanmax(rr))}
                              if np.isfinite(rr).any() else None),
            "value_ratio_first_by_layer": np.nanmean(self.value_ratio(), axis=1).tolist(),
            "cos_q_first_by_layer": np.nanmean(self.cos_first, axis=(0, 2)).tolist(),
            "cos_q_other_by_layer": np.nanmean(self.cos_other, axis=(0, 2)).tolist(),
            "massive_activations": self.massive,
            "mlp_first_token_top_neurons": [
                {"layer": l, "neurons": self.mlp_top_idx[0, l].tolist(),
                 "activation_first": self.mlp_top_act[:, l].mean(0).tolist(),
                 "median_other": self.mlp_top_other[:, l].mean(0).tolist()}
                for l in range(self.mlp_top_idx.shape[1]) if self.mlp_top_idx[0, l, 0] >= 0
            ],
        }
        if self.sink_mass is not None:
            out["learned_sink_mass_by_layer"] = np.nanmean(self.sink_mass, axis=(0, 2)).tolist()
        if self.alpha_proxy is not None:  # models whose rows need not sum to one: Gu et al.'s proxy beside alpha
            out["sink_ratio_proxy"] = self.sink_ratio(0, proxy=True)
            out["attention_on_first_by_layer_proxy"] = np.nanmean(self.alpha_mean(0, proxy=True), axis=1).tolist()
            out["sink_ratio_first_by_layer_proxy"] = (
                self.head_is_sink(0, proxy=True)[self.lengths > 0].mean(axis=(0, 2)).tolist())
            if self.sink_mass is not None:
                out["sink_ratio_slot"] = self.slot_sink_ratio()
            if self.sink_mass_proxy is not None:
                out["sink_ratio_slot_proxy"] = self.slot_sink_ratio(proxy=True)
                out["learned_sink_mass_proxy_by_layer"] = np.nanmean(self.sink_mass_proxy, axis=(0, 2)).tolist()
        if self.unavailable:
            out["unavailable"] = dict(self.unavailable)
        if self.gate_mean is not None and self.gate_closed is not None:
            out["gate_mean_by_layer"] = np.nanmean(self.gate_mean, axis=(0, 2)).tolist()
            out["gate_closed_by_layer"] = np.nanmean(self.gate_closed, axis=(0, 2)).tolist()
        return out

    def to_json(self) -> dict[str, Any]:
        """Everything as JSON-ready values: summaries plus per-head sample means."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return self._to_json()

    def _to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "inputs": self.inputs,
            "attention_layers": self.attention_layers,
            **self.summary(),
            "alpha_0": self.alpha_mean(0).tolist(),
            "head_sink_rate_0": self.head_sink_rate(0).tolist(),
            **({"alpha_0_proxy": self.alpha_mean(0, proxy=True).tolist(),
                "head_sink_rate_0_proxy": self.head_sink_rate(0, proxy=True).tolist()}
               if self.alpha_proxy is not None else {}),
            "residual_norm_first": np.nanmean(self.residual_norm[..., 0], axis=0).tolist(),
            "residual_norm_median_other": self.residual_norm_median_other().tolist(),
            "timing_s": self.timing,
        }


class _Collector:
    """Attention observer plus hook callbacks for one batch; stores reduced numpy arrays per layer."""

    def __init__(self, adapter: ModelAdapter, chunk_bytes: int, fused: bool, tick: Any = None) -> None:
        self.adapter = adapter
        self.tick = tick
        self.chunk_bytes = chunk_bytes
        self.fused = fused
        self.layer_of = {id(adapter.attention_module(l)): l for l in adapter.attention_layers}
        self.valid: Tensor | None = None  # (B, T) bool
        self.attn: dict[int, Any] = {}
        self.residual: dict[int, Tensor] = {}
        self.mlp: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self.gate: dict[int, tuple[Tensor, Tensor]] = {}
        self.massive = MassiveTracker()

    # attention ---------------------------------------------------------------------------------------------
    def observe(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                scaling: float, **kwargs: Any) -> Tensor | None:
        layer = self.layer_of.get(id(module))
        if layer is None or self.valid is None or query.shape[2] != key.shape[2]:
            return None  # not ours, or a cached decoding step: let the base implementation run
        out, stats = attention_with_stats(
            query, key, value, scaling=scaling, mask=attention_mask, query_valid=self.valid, key_valid=self.valid,
            softcap=kwargs.get("softcap"), sink_logits=kwargs.get("s_aux"),
            sliding_window=kwargs.get("sliding_window"), compute_output=self.fused, chunk_bytes=self.chunk_bytes,
        )
        self.attn[layer] = stats
        if self.tick is not None:
            self.tick()
        return out

    # hooks -------------------------------------------------------------------------------------------------
    def hooks(self) -> list[tuple[nn.Module, Any, bool]]:
        a = self.adapter
        hooks: list[tuple[nn.Module, Any, bool]] = []
        for l, layer in enumerate(a.layer_modules):
            hooks.append((layer, lambda x, l=l: self._residual(l, x), False))
            down = a.mlp_down_module(l)
            if down is not None:
                hooks.append((down, lambda x, l=l: self._mlp(l, x), True))
        if a.spec.gated_q:
            for l in a.attention_layers:
                q = a.projection_modules(l)["q"]
                hooks.append((q, lambda x, l=l: self._gate(l, x), False))
        return hooks

    def _residual(self, layer: int, x: Tensor) -> None:
        assert self.valid is not None
        xf = x.detach().float()
        self.residual[layer] = xf.norm(dim=-1)  # (B, T)
        self.massive.update(layer, xf, self.valid)

    def _mlp(self, layer: int, a: Tensor) -> None:
        assert self.valid is not None
        self.mlp[layer] = mlp_top_neurons(a, self.valid)

    def _gate(self, layer: int, q_out: Tensor) -> None:
        assert self.valid is not None
        g = torch.sigmoid(self.adapter.split_gate(q_out.detach().float()))  # (B, T, H, D)
        w = self.valid[:, :, None].float()
        n = w.sum(1).clamp_min(1)  # (B, 1)
        mean = (g.mean(-1) * w).sum(1) / n
        closed = ((g < GATE_CLOSED).float().mean(-1) * w).sum(1) / n
        self.gate[layer] = (mean, closed)


def mlp_top_neurons(a: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The first token's largest |MLP hidden activations| and those neurons' median on the other tokens.

    Args:
        a: MLP hidden activation ``(B, T, F)`` (or ``(B*T, F)``), right-padded rows.
        valid: ``(B, T)`` bool, real tokens.
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


def _pad_right(seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def model_info(model: nn.Module, adapter: ModelAdapter | None = None) -> dict[str, Any]:
    """Architecture facts and provenance recorded with every result."""
    a = adapter or get_adapter(model)
    src = getattr(model, "sinkscope_source", None)
    return {
        "name": getattr(model.config, "name_or_path", "") or getattr(model.config, "_name_or_path", ""),
        "source": src.to_json() if src is not None else {"kind": "object"},
        "model_type": a.model_type, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
        "d_model": a.d_model, "d_head": a.d_head, "positions": a.spec.positions, "max_positions": a.max_positions,
        "attention_layers": a.attention_layers, "learned_sinks": a.spec.sink_param is not None,
        "output_gate": a.spec.gated_q,
        "n_params": int(sum(p.numel() for p in model.parameters())),
    }


def versions() -> dict[str, str]:
    import transformers

    import sinkscope

    return {"sinkscope": sinkscope.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


@torch.no_grad()
def profile_sinks(
    model: nn.Module,
    batch: TokenBatch | list[list[int]],
    *,
    eps: float = 0.3,
    batch_size: int = 8,
    fused: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    pad_token_id: int | None = None,
    progress: Any = None,
) -> SinkProfile:
    """Measure attention sinks, value drains, residual peaks, massive activations and q-k alignment.

    Args:
        model: a loaded HF causal LM of a supported architecture (any attention implementation), or a
            :class:`~sinkscope.models.tinygpt.TinyGPT` (measured from its capture points, see
            `sinkscope.models.tinygpt_adapter`; ``alpha_proxy`` is then set too).
        batch: a `TokenBatch` (see `sinkscope.inputs`) or plain lists of token ids.
        eps: sink threshold for ``Sink_k^eps``.
        batch_size: samples per forward pass (right-padded; padded queries and keys are excluded).
        fused: compute the attention output inside the chunked statistics pass (one attention computation);
            if False, the model's SDPA computes the output and the statistics are recomputed from q and k.
        chunk_bytes: memory budget of one chunk of attention scores.
        pad_token_id: id used for padding (any id works: padded positions are masked).
        progress: optional callable ``progress(done, total)`` called after every attention layer of every
            batch (``total = n_batches * n_attention_layers``).

    Returns:
        A `SinkProfile`.

    Raises:
        UnsupportedArchitectureError: no adapter for the model.
        InputError: a sample longer than the model's context, or eps outside (0, 1).
    """
    if not 0 < eps < 1:
        raise InputError(f"eps must be in (0, 1), got {eps}")
    if batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size}")
    from sinkscope.models import tinygpt_adapter

    if tinygpt_adapter.is_tinygpt(model):
        return tinygpt_adapter.profile_tinygpt(model, batch, eps=eps, batch_size=batch_size,
                                               pad_token_id=pad_token_id, progress=progress)
    adapter = get_adapter(model)
    if not isinstance(batch, TokenBatch):
        batch = TokenBatch([list(map(int, s)) for s in batch], "ids")
    lengths = np.array(batch.lengths)
    ctx = adapter.max_positions
    if ctx is not None and lengths.max() > ctx:
        raise InputError(f"input of {int(lengths.max())} tokens is longer than the model's context ({ctx})")
    device = next(model.parameters()).device
    pad = pad_token_id if pad_token_id is not None else int(getattr(model.config, "pad_token_id", None) or 0)
    N, T, L, La = len(lengths), int(lengths.max()), adapter.n_layers, len(adapter.attention_layers)
    H, Hkv = adapter.n_heads, adapter.n_kv_heads
    nan = np.nan
    alpha = np.full((N, La, H, T), nan, np.float64)
    value_norm = np.full((N, La, Hkv, T), nan, np.float32)
    residual = np.full((N, L, T), nan, np.float32)
    cos_first, cos_other, out_norm = (np.full((N, La, H), nan) for _ in range(3))
    sink_mass = np.full((N, La, H), nan) if adapter.spec.sink_param else None
    gate_mean = np.full((N, La, H), nan) if adapter.spec.gated_q else None
    gate_closed = np.full((N, La, H), nan) if adapter.spec.gated_q else None
    mlp_idx = np.full((N, L, TOP_NEURONS), -1, np.int64)
    mlp_act, mlp_other = np.full((N, L, TOP_NEURONS), nan), np.full((N, L, TOP_NEURONS), nan)

    n_batches = -(-N // batch_size)
    steps = {"done": 0, "total": n_batches * La}

    def tick() -> None:
        steps["done"] += 1
        if progress is not None:
            progress(steps["done"], steps["total"])

    collector = _Collector(adapter, chunk_bytes, fused, tick)
    t0 = time.perf_counter()
    order = np.argsort(-lengths, kind="stable")  # similar lengths together: less padding
    with observe_attention(model, collector), forward_hooks(collector.hooks()):
        for start in range(0, N, batch_size):
            rows = order[start:start + batch_size]
            ids, mask = _pad_right([batch.sequences[i] for i in rows], pad)
            ids, mask = ids.to(device), mask.to(device)
            collector.valid = mask.bool()
            collector.massive.rows = rows
            collector.attn.clear(), collector.residual.clear(), collector.mlp.clear(), collector.gate.clear()
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            t = ids.shape[1]
            for j, li in enumerate(adapter.attention_layers):
                s = collector.attn[li]
                alpha[rows, j, :, :t] = s.alpha.cpu().numpy()
                value_norm[rows, j, :, :t] = s.value_norm.cpu().numpy()
                n_cos = s.n_cos.clamp_min(1)[:, None]
                cos_first[rows, j] = (s.cos_first / n_cos).cpu().numpy()
                cos_other[rows, j] = (s.cos_other / n_cos).cpu().numpy()
                out_norm[rows, j] = (s.out_norm / s.n_queries.clamp_min(1)[:, None]).cpu().numpy()
                if sink_mass is not None and s.sink_mass is not None:
                    sink_mass[rows, j] = (s.sink_mass / s.n_queries.clamp_min(1)[:, None]).cpu().numpy()
                if gate_mean is not None and gate_closed is not None and li in collector.gate:
                    gate_mean[rows, j] = collector.gate[li][0].cpu().numpy()
                    gate_closed[rows, j] = collector.gate[li][1].cpu().numpy()
            for l in range(L):
                residual[rows, l, :t] = collector.residual[l].cpu().numpy()
                if l in collector.mlp:
                    i_, v_, m_ = collector.mlp[l]
                    mlp_idx[rows, l, : i_.shape[1]] = i_.cpu().numpy()
                    mlp_act[rows, l, : v_.shape[1]] = v_.cpu().numpy()
                    mlp_other[rows, l, : m_.shape[1]] = m_.cpu().numpy()
            for i, n in zip(rows, lengths[rows]):  # padded positions are not measurements
                alpha[i, ..., n:] = nan
                value_norm[i, ..., n:] = nan
                residual[i, ..., n:] = nan
    elapsed = time.perf_counter() - t0
    return SinkProfile(
        model=model_info(model, adapter), inputs={**batch.to_json(), "versions": versions()},
        attention_layers=adapter.attention_layers, lengths=lengths, alpha=alpha, value_norm=value_norm,
        residual_norm=residual, cos_first=cos_first, cos_other=cos_other, out_norm=out_norm,
        mlp_top_idx=mlp_idx, mlp_top_act=mlp_act, mlp_top_other=mlp_other,
        massive=collector.massive.summary(), sink_mass=sink_mass, gate_mean=gate_mean,
        gate_closed=gate_closed, eps=eps, timing={"forward_s": elapsed},
    )
