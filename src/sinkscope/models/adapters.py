"""Architecture adapters: a data table mapping HF model types to module paths and attention facts.

An adapter says, for one ``config.model_type``, where the decoder layers, attention modules, q/k/v projections
and MLP down projections live, how q/k/v come out of fused projections, whether the architecture has a learned
per-head sink logit or an output gate, and which positional scheme it uses. Everything the profiler needs is
read through `ModelAdapter` so no measurement code branches on architecture names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from sinkscope.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    """Static description of one architecture family (module paths are relative to the layer module)."""

    layers: str  # path from the model root to the ModuleList of decoder layers
    attn: str  # attention module inside a layer
    mlp_down: str | None  # module whose *input* is the MLP hidden activation (None: MoE / not uniform)
    q: str | None = "q_proj"  # inside the attention module; None when fused
    k: str | None = "k_proj"
    v: str | None = "v_proj"
    fused_qkv: str | None = None  # name of a fused projection (GPT-2 c_attn, NeoX query_key_value, Phi-3 qkv_proj)
    fused_layout: str = ""  # "concat" (q|k|v along features) or "neox" (per head [q k v])
    o: str = "o_proj"  # attention output projection W_O inside the attention module (input: heads concatenated)
    attn_norm: str | None = "input_layernorm"  # the norm before attention, inside the layer (pre-norm models)
    positions: str = "rope"  # rope | rope-partial | learned
    sink_param: str | None = None  # attribute of the attention module holding per-head sink logits
    gated_q: bool = False  # Qwen3-Next style: q_proj outputs [q, gate] per head; output *= sigmoid(gate)
    #: config attribute listing per-layer types (only "full/sliding" layers are attention)
    attn_type_attr: str | None = None
    gqa: bool = True  # whether the architecture can have fewer key/value heads than query heads


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("model.layers", "self_attn", "mlp.down_proj"),
    "mistral": ArchSpec("model.layers", "self_attn", "mlp.down_proj"),
    "qwen2": ArchSpec("model.layers", "self_attn", "mlp.down_proj"),
    "qwen3": ArchSpec("model.layers", "self_attn", "mlp.down_proj"),
    "gemma2": ArchSpec("model.layers", "self_attn", "mlp.down_proj"),
    "phi3": ArchSpec("model.layers", "self_attn", "mlp.down_proj", q=None, k=None, v=None,
                     fused_qkv="qkv_proj", fused_layout="concat", positions="rope-partial"),
    "gpt2": ArchSpec("transformer.h", "attn", "mlp.c_proj", q=None, k=None, v=None,
                     fused_qkv="c_attn", fused_layout="concat", o="c_proj", attn_norm="ln_1", positions="learned",
                     gqa=False),
    "gpt_neox": ArchSpec("gpt_neox.layers", "attention", "mlp.dense_4h_to_h", q=None, k=None, v=None,
                         fused_qkv="query_key_value", fused_layout="neox", o="dense", positions="rope-partial",
                         gqa=False),
    "opt": ArchSpec("model.decoder.layers", "self_attn", "fc2", o="out_proj", attn_norm="self_attn_layer_norm",
                   positions="learned", gqa=False),
    "gpt_oss": ArchSpec("model.layers", "self_attn", None, sink_param="sinks"),
    "qwen3_next": ArchSpec("model.layers", "self_attn", None, gated_q=True, attn_type_attr="layer_types"),
}


def supported_architectures() -> list[str]:
    """Model types with an adapter (only those the installed transformers knows)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return sorted(t for t in ARCHITECTURES if t in CONFIG_MAPPING_NAMES)


def _get(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


@dataclass
class ModelAdapter:
    """Uniform per-layer access to a loaded HF causal LM.

    Attributes:
        model_type: ``config.model_type``.
        spec: the architecture's `ArchSpec`.
        layer_modules: decoder layers, ``n_layers`` of them.
        attention_layers: indices of the layers that have softmax attention (all, except hybrid models).
    """

    model: nn.Module
    model_type: str
    spec: ArchSpec
    layer_modules: list[nn.Module] = field(repr=False)
    attention_layers: list[int]

    # ---- shapes ------------------------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def n_layers(self) -> int:
        return len(self.layer_modules)

    @property
    def n_heads(self) -> int:
        c = self.config
        return int(getattr(c, "num_attention_heads", None) or c.n_head)

    @property
    def n_kv_heads(self) -> int:
        n = getattr(self.config, "num_key_value_heads", None) if self.spec.gqa else None
        return int(n) if n else self.n_heads

    @property
    def d_model(self) -> int:
        c = self.config
        return int(getattr(c, "hidden_size", None) or c.n_embd)

    @property
    def d_head(self) -> int:
        hd = getattr(self.config, "head_dim", None)
        return int(hd) if hd else self.d_model // self.n_heads

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head (GQA grouping)."""
        return self.n_heads // self.n_kv_heads

    @property
    def max_positions(self) -> int | None:
        c = self.config
        for name in ("max_position_embeddings", "n_positions", "n_ctx"):
            v = getattr(c, name, None)
            if v:
                return int(v)
        return None

    @property
    def softcap(self) -> float | None:
        return getattr(self.config, "attn_logit_softcapping", None)

    # ---- modules -----------------------------------------------------------------------------------------
    def attention_module(self, layer: int) -> nn.Module:
        return _get(self.layer_modules[layer], self.spec.attn)

    def mlp_down_module(self, layer: int) -> nn.Module | None:
        """Module whose input is the MLP hidden activation ``act(gate) * up`` (shape (B, T, d_ff))."""
        if self.spec.mlp_down is None:
            return None
        return _get(self.layer_modules[layer], self.spec.mlp_down)

    def projection_modules(self, layer: int) -> dict[str, nn.Module]:
        """``{"q","k","v"}`` projections, or ``{"qkv"}`` when fused."""
        attn = self.attention_module(layer)
        if self.spec.fused_qkv:
            return {"qkv": getattr(attn, self.spec.fused_qkv)}
        return {n: getattr(attn, getattr(self.spec, n)) for n in ("q", "k", "v")}

    def output_projection(self, layer: int) -> nn.Module:
        """The attention output projection W_O of ``layer``; its input is the head outputs concatenated,
        ``(B, T, H * D)``."""
        return getattr(self.attention_module(layer), self.spec.o)

    def attention_norm(self, layer: int) -> nn.Module | None:
        """The norm applied to the residual stream before ``layer``'s attention (None if the table has none)."""
        return _get(self.layer_modules[layer], self.spec.attn_norm) if self.spec.attn_norm else None

    def scaling(self, layer: int) -> float:
        """Factor multiplying q.k before softmax (OPT folds it into q_proj, reported as d_head**-0.5)."""
        attn = self.attention_module(layer)
        if self.model_type == "opt":
            return float(self.d_head**-0.5)
        return float(getattr(attn, "scaling", self.d_head**-0.5))

    def sliding_window(self, layer: int) -> int | None:
        """Window size of a layer (keys visible to a query: the last ``window`` positions), or None."""
        attn = self.attention_module(layer)
        w = getattr(attn, "sliding_window", None)
        if w is None and self.model_type in ("mistral", "phi3"):
            w = getattr(self.config, "sliding_window", None)
        return int(w) if w else None

    def sink_logits(self, layer: int) -> torch.Tensor | None:
        """Learned per-head sink logits ``s_h`` (shape (H,)) for architectures that have them."""
        if not self.spec.sink_param:
            return None
        return getattr(self.attention_module(layer), self.spec.sink_param, None)

    def split_gate(self, q_proj_out: torch.Tensor) -> torch.Tensor:
        """From a gated q projection output (B, T, H*2*D), the gate logits (B, T, H, D)."""
        B, T, _ = q_proj_out.shape
        return q_proj_out.view(B, T, self.n_heads, 2 * self.d_head)[..., self.d_head:]

    def split_qkv(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split a fused projection output (B, T, F) into q (B,T,H,D), k and v (B,T,Hkv,D) before RoPE."""
        B, T, _ = fused.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.d_head
        if self.spec.fused_layout == "neox":
            qkv = fused.view(B, T, H, 3 * D)
            q, k, v = qkv.split(D, dim=-1)
            return q, k, v
        q, k, v = fused.split([H * D, Hkv * D, Hkv * D], dim=-1)
        return q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)


def pad_token_id(model: nn.Module, override: int | None = None) -> int:
    """The id to pad batches with: ``override``, else the model config's ``pad_token_id``, else 0.

    Any id works where padded positions are masked (every measurement here masks them).
    """
    if override is not None:
        return int(override)
    return int(getattr(getattr(model, "config", None), "pad_token_id", None) or 0)


def has_adapter(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers model of an architecture in the table."""
    return getattr(getattr(model, "config", None), "model_type", None) in ARCHITECTURES


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter of a loaded model.

    Raises:
        UnsupportedArchitectureError: no adapter for ``model.config.model_type`` (the message lists the
            supported ones).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(supported_architectures())}"
        )
    spec = ARCHITECTURES[model_type]
    # cast: every registered spec.layers names the decoder's nn.ModuleList (an iterable of the layer modules)
    layers = list(cast(nn.ModuleList, _get(model, spec.layers)))
    if spec.attn_type_attr and getattr(model.config, spec.attn_type_attr, None):
        types = list(getattr(model.config, spec.attn_type_attr))
        attention_layers = [i for i, t in enumerate(types) if "linear" not in t]
    else:
        attention_layers = list(range(len(layers)))
    attention_layers = [i for i in attention_layers if hasattr(layers[i], spec.attn.split(".")[0])]
    return ModelAdapter(model, model_type, spec, layers, attention_layers)
