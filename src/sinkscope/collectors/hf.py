"""The Hugging Face collector: measures a transformers causal LM through the registered attention function.

Attention calls go through ``"sinkscope"`` (`sinkscope.capture.observe_attention`), which hands query, key and
value to `attention_with_stats` (column statistics in query chunks, never the (B, H, T, T) matrix); forward
hooks on the decoder layers, the MLP down projections and (for gated models) the q projections record the
residual stream, the first token's top neurons and the output gate. Architecture facts come from the adapter
table (`sinkscope.models.adapters`); no module's ``forward`` is replaced.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from sinkscope.collectors.base import GATE_CLOSED, Collector
from sinkscope.errors import InputError
from sinkscope.metrics.attention_stats import DEFAULT_CHUNK_BYTES, attention_with_stats
from sinkscope.metrics.sink import alpha_from_sums
from sinkscope.models.adapters import ModelAdapter, get_adapter


class HFCollector(Collector):
    """Collector of a transformers model with an adapter (see `Collector`).

    Args:
        model: the model.
        fused: compute the attention output inside the statistics pass (one attention computation); if False,
            the model's own attention computes it and the statistics are recomputed from q and k.
        chunk_bytes: memory budget of one chunk of attention scores.
        adapter: the model's adapter, if the caller resolved it already.
        prefix_len: must be 0 (prefix LMs are a tinygpt setting).
    """

    name = "hf"

    def __init__(self, model: nn.Module, *, fused: bool = True, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 adapter: ModelAdapter | None = None, prefix_len: int = 0) -> None:
        super().__init__()
        if prefix_len:
            raise InputError("prefix_len is a tinygpt setting; Hugging Face models are measured as causal LMs")
        a = adapter or get_adapter(model)
        self.model, self.adapter, self.fused, self.chunk_bytes = model, a, fused, chunk_bytes
        self.n_layers, self.attention_layers = a.n_layers, list(a.attention_layers)
        self.n_heads, self.n_kv_heads, self.max_positions = a.n_heads, a.n_kv_heads, a.max_positions
        self.vocab_size = getattr(model.config, "vocab_size", None)
        if a.spec.sink_param:
            self.provides.add("sink_mass")
        if a.spec.gated_q:
            self.provides |= {"gate_mean", "gate_closed"}
        self.layer_of = {id(a.attention_module(l)): l for l in a.attention_layers}

    @staticmethod
    def accepts(model: nn.Module) -> bool:
        return True

    def model_info(self) -> dict[str, Any]:
        return model_info(self.model, self.adapter)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        from sinkscope.capture import forward_hooks, observe_attention  # loads transformers' attention registry

        with observe_attention(self.model, self), forward_hooks(self.hooks()):
            yield

    def forward(self, ids: Tensor, mask: Tensor) -> None:
        self.model(input_ids=ids, attention_mask=mask, use_cache=False)

    # ---- attention (called by the registered attention function) -----------------------------------------
    def observe(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                scaling: float, **kwargs: Any) -> Tensor | None:
        """Column statistics of one attention call, reduced to this batch's per-head records (on the layer's
        device); returns the attention output (or None: the base implementation computes it)."""
        layer = self.layer_of.get(id(module))
        if layer is None or self.valid is None or query.shape[2] != key.shape[2]:
            return None  # not ours, or a cached decoding step: let the base implementation run
        valid = self.valid_on(query.device)
        out, s = attention_with_stats(
            query, key, value, scaling=scaling, mask=attention_mask, query_valid=valid, key_valid=valid,
            softcap=kwargs.get("softcap"), sink_logits=kwargs.get("s_aux"),
            sliding_window=kwargs.get("sliding_window"), compute_output=self.fused, chunk_bytes=self.chunk_bytes,
        )
        n_q = s.n_queries.clamp_min(1)[:, None]  # (B, 1)
        n_cos = s.n_cos.clamp_min(1)[:, None]
        rec = self.attn.setdefault(layer, {})
        rec.update(alpha=alpha_from_sums(s.colsum, s.count), value_norm=s.value_norm,
                   cos_first=s.cos_first / n_cos, cos_other=s.cos_other / n_cos, out_norm=s.out_norm / n_q)
        if s.sink_mass is not None:
            rec["sink_mass"] = s.sink_mass / n_q
        self.tick()
        return out

    # ---- hooks ---------------------------------------------------------------------------------------------
    def hooks(self) -> list[tuple[nn.Module, Any, bool]]:
        """``(module, fn, pre)`` forward hooks: decoder layers, MLP down projections, gated q projections."""
        a = self.adapter
        hooks: list[tuple[nn.Module, Any, bool]] = []
        for l, layer in enumerate(a.layer_modules):
            hooks.append((layer, lambda x, l=l: self.record_residual(l, x), False))
            down = a.mlp_down_module(l)
            if down is not None:
                hooks.append((down, lambda x, l=l: self.record_mlp(l, x), True))
        if a.spec.gated_q:
            for l in a.attention_layers:
                q = a.projection_modules(l)["q"]
                hooks.append((q, lambda x, l=l: self._gate(l, x), False))
        return hooks

    def _gate(self, layer: int, q_out: Tensor) -> None:
        """Output gate ``sigmoid(g)`` from the gated q projection ``(B, T, H * 2D)``: per-head mean and the share
        of entries below `GATE_CLOSED`, over real tokens."""
        g = torch.sigmoid(self.adapter.split_gate(q_out.detach().float()))  # (B, T, H, D)
        w = self.valid_on(g.device)[:, :, None].float()
        n = w.sum(1).clamp_min(1)  # (B, 1)
        self.attn.setdefault(layer, {}).update(
            gate_mean=(g.mean(-1) * w).sum(1) / n, gate_closed=((g < GATE_CLOSED).float().mean(-1) * w).sum(1) / n)


def model_info(model: nn.Module, adapter: ModelAdapter | None = None) -> dict[str, Any]:
    """Architecture facts and provenance of a transformers model, recorded with every result."""
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
