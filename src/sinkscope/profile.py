"""The sink profiler: one loop over a batch of token sequences, all extreme-token metrics, linear memory.

`profile_sinks` is the only entry. It picks the collector of the model's family (`sinkscope.collectors`:
Hugging Face models through the registered attention function, tinygpt through its capture points), runs the
samples in right-padded batches, and copies each layer's records into the arrays of a `SinkProfile`. The
arrays and their shapes are declared once, as `SinkProfile` fields made with `stat`; the numbers behind the
sink summaries are defined once, in `sinkscope.metrics.sink`. No T x T matrix is kept.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from sinkscope.collectors import collector_for
from sinkscope.collectors.base import GATE_CLOSED as GATE_CLOSED
from sinkscope.collectors.base import TOP_NEURONS as TOP_NEURONS
from sinkscope.collectors.base import Collector
from sinkscope.errors import InputError
from sinkscope.inputs import TokenBatch, as_token_batch, pad_batch
from sinkscope.io import ensure_output_dir, finite_json, save_figure_atomic, write_csv_atomic, write_json_atomic
from sinkscope.metrics.attention_stats import DEFAULT_CHUNK_BYTES
from sinkscope.metrics.sink import DEFAULT_EPS, check_count, check_eps, first_vs_median, is_sink
from sinkscope.models.adapters import ModelAdapter
from sinkscope.models.adapters import pad_token_id as model_pad_token_id
from sinkscope.progress import ProgressCallback
from sinkscope.versions import versions

if TYPE_CHECKING:
    import pandas

#: Axis letters of a statistic after the sample axis N: ``attn`` = attention layers (La), ``layer`` = decoder
#: layers (L), ``head`` = query heads (H), ``kv`` = key/value heads (Hkv), ``key`` = key positions (T),
#: ``top`` = `TOP_NEURONS`.
AXES = ("attn", "layer", "head", "kv", "key", "top")


@dataclass(frozen=True)
class ProfileOptions:
    """How `profile_sinks` measures, checked once when built (before any model loads).

    Attributes:
        eps: sink threshold of ``Sink_k^eps``, in (0, 1).
        batch_size: samples per forward pass (right-padded; padded queries and keys are excluded), >= 1.
        fused: (HF models) compute the attention output inside the chunked statistics pass.
        chunk_bytes: (HF models) memory budget of one chunk of attention scores, >= 1.

    Raises:
        InputError: a value outside its range (one line naming the option).
    """

    eps: float = DEFAULT_EPS
    batch_size: int = 8
    fused: bool = True
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", check_eps(self.eps))
        check_count(self.batch_size, param="batch_size", minimum=1)
        check_count(self.chunk_bytes, param="chunk_bytes", minimum=1)


def stat(axes: str, *, dtype: Any = np.float64, fill: float = np.nan, optional: bool = False) -> Any:
    """Declare a per-sample statistic of `SinkProfile`: an ``(N, *axes)`` array filled by the collectors.

    Args:
        axes: comma-separated axis letters after N (see `AXES`); the first is ``attn`` or ``layer`` (which
            records the statistic comes from).
        dtype, fill: array dtype and the value where nothing was measured.
        optional: the field is None unless the model's collector lists it in ``provides``.
    """
    meta = {"axes": tuple(axes.split(",")), "dtype": dtype, "fill": fill}
    return field(default=None, metadata=meta) if optional else field(metadata=meta)


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
        analyses: results of analyses run on the same inputs (e.g. ``qk_alignment``), written into
            ``profile.json`` beside the summaries.
        versions: the packages that made the profile (`sinkscope.versions.versions`).
    """

    model: dict[str, Any]
    inputs: dict[str, Any]
    attention_layers: list[int]
    lengths: np.ndarray
    # before the statistics: mypy takes every `stat` call for a default, so the required fields come first
    massive: list[dict[str, Any]]
    alpha: np.ndarray = stat("attn,head,key")
    value_norm: np.ndarray = stat("attn,kv,key", dtype=np.float32)
    residual_norm: np.ndarray = stat("layer,key", dtype=np.float32)
    cos_first: np.ndarray = stat("attn,head")
    cos_other: np.ndarray = stat("attn,head")
    out_norm: np.ndarray = stat("attn,head")
    mlp_top_idx: np.ndarray = stat("layer,top", dtype=np.int64, fill=-1)
    mlp_top_act: np.ndarray = stat("layer,top")
    mlp_top_other: np.ndarray = stat("layer,top")
    sink_mass: np.ndarray | None = stat("attn,head", optional=True)
    gate_mean: np.ndarray | None = stat("attn,head", optional=True)
    gate_closed: np.ndarray | None = stat("attn,head", optional=True)
    eps: float = DEFAULT_EPS
    timing: dict[str, float] = field(default_factory=dict)
    alpha_proxy: np.ndarray | None = stat("attn,head,key", optional=True)
    sink_mass_proxy: np.ndarray | None = stat("attn,head", optional=True)
    unavailable: dict[str, str] = field(default_factory=dict)
    analyses: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    @classmethod
    def statistics(cls) -> dict[str, dict[str, Any]]:
        """Field name -> ``{"axes", "dtype", "fill"}`` of every per-sample statistic (see `stat`), optional
        ones included."""
        return {f.name: dict(f.metadata) for f in fields(cls) if "axes" in f.metadata}

    # ---- sinks -------------------------------------------------------------------------------------------
    def alpha_of(self, proxy: bool = False) -> np.ndarray:
        """(N, La, H, T) alpha from the weights used, or (``proxy``) from the row-normalised proxy."""
        if not proxy:
            return self.alpha
        if self.alpha_proxy is None:
            raise InputError("this profile has no row-normalised proxy (its attention rows sum to one: use alpha)")
        return self.alpha_proxy

    def _eps(self, eps: float | None) -> float:
        """The threshold to use: the profile's, or ``eps`` checked as `profile_sinks` checks it."""
        return self.eps if eps is None else check_eps(eps)

    def _position(self, k: int) -> int:
        """A key position checked: an integer within the longest sample (InputError otherwise)."""
        k = check_count(k, param="k")
        if not (self.lengths > k).any():
            raise InputError(f"no sample is longer than position {k} (the longest has {int(self.lengths.max())} "
                             "tokens)", param="k")
        return k

    def head_is_sink(self, k: int = 0, eps: float | None = None, *, proxy: bool = False) -> np.ndarray:
        """(N, La, H) bool: alpha_k > eps (False where the sample is shorter than k + 1)."""
        return is_sink(self.alpha_of(proxy)[..., self._position(k)], self._eps(eps))

    def sink_ratio(self, k: int = 0, eps: float | None = None, *, proxy: bool = False) -> float:
        """``Sink_k^eps``: share of heads whose alpha_k exceeds eps, averaged over the samples (Gu et al.);
        ``proxy``: from the row-normalised proxy (Gu et al.'s * numbers for non-softmax attention).

        Raises:
            InputError: ``k`` not an integer within the samples, ``eps`` outside (0, 1).
        """
        valid = self.lengths > self._position(k)
        return float(self.head_is_sink(k, eps, proxy=proxy)[valid].mean())

    def slot_sink_ratio(self, eps: float | None = None, *, proxy: bool = False) -> float:
        """Gu et al.'s ``Sink_*``: share of heads (and samples) whose sink-slot mass exceeds eps."""
        mass = self.sink_mass_proxy if proxy else self.sink_mass
        if mass is None:
            raise InputError("this model has no sink slot (learned sink, key bias, sink token or softmax + 1)")
        return float(is_sink(mass, self._eps(eps)).mean())

    def sink_ratio_by_position(self, eps: float | None = None, *, proxy: bool = False) -> np.ndarray:
        """(T_min,) ``Sink_k^eps`` for every key position present in all samples."""
        t = int(self.lengths.min())
        return is_sink(self.alpha_of(proxy)[..., :t], self._eps(eps)).mean(axis=(0, 1, 2))

    def top_sinks(self, n: int = 5, eps: float | None = None) -> list[dict[str, float]]:
        """The ``n`` key positions with the highest sink ratio (position 0 included; ``n >= 0``)."""
        n = check_count(n, param="n")
        r = self.sink_ratio_by_position(eps)
        order = np.argsort(-r, kind="stable")[:n]
        return [{"position": int(k), "sink_ratio": float(r[k])} for k in order]

    def head_sink_rate(self, k: int = 0, eps: float | None = None, *, proxy: bool = False) -> np.ndarray:
        """(La, H) share of samples in which the head sinks on position k."""
        valid = self.lengths > self._position(k)
        return self.head_is_sink(k, eps, proxy=proxy)[valid].mean(axis=0)

    def alpha_mean(self, k: int = 0, *, proxy: bool = False) -> np.ndarray:
        """(La, H) alpha_k averaged over the samples."""
        return np.nanmean(self.alpha_of(proxy)[self.lengths > self._position(k)][..., k], axis=0)

    # ---- norms -------------------------------------------------------------------------------------------
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
        return first_vs_median(self.residual_norm, self.lengths)

    def value_ratio(self) -> np.ndarray:
        """(La, Hkv) the first token's value norm over the median other token's (small = value drain)."""
        return first_vs_median(self.value_norm, self.lengths)

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
                if a0p is not None:  # a profile with a row-normalised proxy
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
        """Everything as JSON-ready values (what ``profile.json`` holds): summaries, per-head sample means, the
        attached analyses and the package versions; a value that was not measured (NaN) is None (null)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return finite_json(self._to_json())

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
            **self.analyses,
            "versions": self.versions,
        }

    def save(self, directory: str | Path) -> list[Path]:
        """Write ``profile.json`` (`to_json`), ``heads.csv`` (`heads_rows`) and the figures of
        `sinkscope.viz.plots.PLOTS` into ``directory`` (created), each file atomically; returns the paths written."""
        from sinkscope.viz.plots import PLOTS

        d = ensure_output_dir(directory)
        write_json_atomic(d / "profile.json", self.to_json())
        write_csv_atomic(d / "heads.csv", self.heads_rows())
        for name, plot in PLOTS.items():
            save_figure_atomic(d / name, plot(self))
        return [d / "profile.json", d / "heads.csv", *(d / name for name in PLOTS)]

    def to_pandas(self) -> pandas.DataFrame:
        """The per-sample statistics as one long-format DataFrame (needs pandas: ``pip install sinkscope[pandas]``).

        One row per measured value, per sample (average with ``groupby``): columns ``sample``, ``layer`` (the
        model's layer index), ``head`` (the query head; the key/value head for ``value_norm``), ``key_position``,
        ``statistic`` (the `SinkProfile` field name) and ``value``. ``head`` / ``key_position`` are missing
        (``<NA>``) for statistics without that axis; padded positions and unmeasured entries (NaN) are left out.
        The MLP top-neuron fields (neuron ids, not positions) are not included.

        Raises:
            ImportError: pandas is not installed (with the command that installs it).
        """
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("SinkProfile.to_pandas needs pandas: pip install 'sinkscope[pandas]'") from e
        frames = []
        for name, meta in self.statistics().items():
            arr = getattr(self, name)
            axes = meta["axes"]
            if arr is None or "top" in axes:
                continue
            idx = np.nonzero(np.isfinite(arr))  # one index array per axis, NaN (padding, unmeasured) left out
            cols: dict[str, Any] = {"sample": idx[0]}
            layers = np.asarray(self.attention_layers if axes[0] == "attn" else range(arr.shape[1]))
            cols["layer"] = layers[idx[1]]
            cols["head"] = pd.array(idx[2], dtype="Int64") if len(axes) > 1 and axes[1] in ("head", "kv") else (
                pd.array([pd.NA] * len(idx[0]), dtype="Int64"))
            cols["key_position"] = pd.array(idx[-1], dtype="Int64") if axes[-1] == "key" else (
                pd.array([pd.NA] * len(idx[0]), dtype="Int64"))
            cols["statistic"] = name
            cols["value"] = arr[idx].astype(np.float64)
            frames.append(pd.DataFrame(cols))
        return pd.concat(frames, ignore_index=True)


def model_info(model: nn.Module, adapter: ModelAdapter | None = None) -> dict[str, Any]:
    """Architecture facts and provenance recorded with every result (from the model's collector)."""
    return collector_for(model, adapter=adapter).model_info()


def _allocate(collector: Collector, N: int, T: int) -> dict[str, np.ndarray | None]:
    """The arrays of every `SinkProfile` statistic for ``N`` samples of at most ``T`` tokens (None for an
    optional statistic the collector does not provide)."""
    size = {"attn": len(collector.attention_layers), "layer": collector.n_layers, "head": collector.n_heads,
            "kv": collector.n_kv_heads, "key": T, "top": TOP_NEURONS}
    out: dict[str, np.ndarray | None] = {}
    for name, f in SinkProfile.statistics().items():
        optional = next(x for x in fields(SinkProfile) if x.name == name).default is None
        if optional and name not in collector.provides:
            out[name] = None
            continue
        out[name] = np.full((N, *(size[a] for a in f["axes"])), f["fill"], f["dtype"])
    return out


@torch.no_grad()
def profile_sinks(
    model: nn.Module,
    batch: TokenBatch | Sequence[Sequence[int]] | Mapping[str, Any],
    *,
    eps: float = DEFAULT_EPS,
    batch_size: int = 8,
    fused: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    pad_token_id: int | None = None,
    progress: ProgressCallback | None = None,
    adapter: ModelAdapter | None = None,
    prefix_len: int = 0,
) -> SinkProfile:
    """Measure attention sinks, value drains, residual peaks, massive activations and q-k alignment.

    Args:
        model: a loaded HF causal LM of a supported architecture (any attention implementation, any device or
            dtype, also spread over devices with ``device_map``), or a :class:`~sinkscope.models.tinygpt.TinyGPT`
            (measured from its capture points; ``alpha_proxy`` is then set too).
        batch: a `TokenBatch` (see `sinkscope.inputs`), lists of token ids, or a tokenizer's output (a
            ``BatchEncoding`` or a dict with ``input_ids`` and optionally ``attention_mask``, lists or tensors,
            left- or right-padded: the mask strips the padding).
        eps: sink threshold for ``Sink_k^eps``.
        batch_size: samples per forward pass (right-padded; padded queries and keys are excluded).
        fused: (HF models) compute the attention output inside the chunked statistics pass (one attention
            computation); if False, the model's attention computes the output and the statistics are recomputed
            from q and k.
        chunk_bytes: (HF models) memory budget of one chunk of attention scores.
        pad_token_id: id used for padding (any id works: padded positions are masked).
        progress: ``progress(done, total, "layers")`` after every attention layer of every batch
            (``total = n_batches * n_attention_layers``; `sinkscope.progress`).
        adapter: the model's adapter, if the caller resolved it already (HF models).
        prefix_len: (tinygpt) prefix-LM length: the first ``prefix_len`` tokens attend bidirectionally.

    Returns:
        A `SinkProfile`; its statistics are accumulated in fp32/fp64 whatever the model's dtype.

    Raises:
        UnsupportedArchitectureError: no adapter for the model.
        InputError: inputs that are not token ids, a sample longer than the model's context or with ids outside
            its vocabulary, eps outside (0, 1), batch_size < 1.
    """
    opts = ProfileOptions(eps=eps, batch_size=batch_size, fused=fused, chunk_bytes=chunk_bytes)
    eps, batch_size = opts.eps, opts.batch_size
    batch = as_token_batch(batch)
    collector = collector_for(model, fused=fused, chunk_bytes=chunk_bytes, adapter=adapter, prefix_len=prefix_len)
    collector.check(batch.sequences)
    lengths = np.array(batch.lengths)
    N, T = len(lengths), int(lengths.max())
    arrays = _allocate(collector, N, T)
    per_key = [n for n, f in SinkProfile.statistics().items() if f["axes"][-1] == "key" and arrays[n] is not None]
    pad = model_pad_token_id(model, pad_token_id)

    n_batches = -(-N // batch_size)
    steps = {"done": 0, "total": n_batches * len(collector.attention_layers)}

    def tick() -> None:
        steps["done"] += 1
        if progress is not None:
            progress(steps["done"], steps["total"], "")

    collector.tick = tick
    t0 = time.perf_counter()
    order = np.argsort(-lengths, kind="stable")  # similar lengths together: less padding
    with collector.installed():
        for start in range(0, N, batch_size):
            rows = order[start:start + batch_size]
            ids, mask = pad_batch([batch.sequences[i] for i in rows], pad, device=collector.input_device)
            collector.run(ids, mask, rows)
            for j, layer in enumerate(collector.attention_layers):  # one copy per record, each to the host
                _fill(arrays, rows, j, collector.attn.get(layer, {}))
            for layer in range(collector.n_layers):
                _fill(arrays, rows, layer, collector.layers.get(layer, {}))
            for i, n in zip(rows, lengths[rows]):  # padded positions are not measurements
                for name in per_key:
                    arrays[name][i, ..., n:] = np.nan  # type: ignore[index]  # per_key names allocated arrays only
    elapsed = time.perf_counter() - t0
    return SinkProfile(
        model=collector.model_info(), inputs=batch.to_json(), versions=versions(),
        attention_layers=list(collector.attention_layers), lengths=lengths, massive=collector.massive.summary(),
        eps=eps, timing={"forward_s": elapsed}, unavailable=dict(collector.unavailable),
        # cast: _allocate gives every required statistic an array; None only for optional ones the model lacks
        **cast(dict[str, Any], arrays),
    )


def _fill(arrays: dict[str, np.ndarray | None], rows: np.ndarray, index: int, records: dict[str, Any]) -> None:
    """Copy one layer's records ``{name: (B, ...)}`` into ``arrays[name][rows, index, ...]`` (leading part of
    each remaining axis: the batch's padded length, or fewer top neurons)."""
    for name, t in records.items():
        arr = arrays[name]
        if arr is None:
            raise KeyError(f"collector recorded {name!r}, which it does not list in provides")
        value = t.detach().cpu().numpy()
        where: tuple[Any, ...] = (rows, index, *(slice(0, d) for d in value.shape[1:]))
        arr[where] = value
