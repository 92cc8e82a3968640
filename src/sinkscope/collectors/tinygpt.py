"""The tinygpt collector: measures a `TinyGPT` from its own capture points.

Hugging Face models reach the profiler through their attention function (`sinkscope.collectors.hf`); tinygpt
computes its attention weights itself, with operations whose rows need not sum to one (sigmoid, relu, elu1,
softmax + 1) and optional sink slots (a learned key bias, a learnable sink token, softmax + 1's virtual key).
Forward hooks on tinygpt's capture points (``layers.{i}.attn.capture_weights`` / ``capture_slot`` /
``capture_values``, ``layers.{i}.capture_resid``) and on its q/k/v projection, output projection and MLP down
projection record the same statistics; no module's forward is replaced. Each layer's ``(B, H, Q, K)`` weights
are reduced to column sums as soon as the layer has run (one layer's weights alive at a time; tinygpt sizes
make that matrix small).

Two sink scores per key (RESEARCH.md §1 and §4, both defined in `sinkscope.metrics.sink`):

- ``alpha``: from the weights the model actually used. For unnormalised kinds rows need not sum to one; the
  sink slot's mean weight is ``sink_mass`` (reported like gpt-oss's learned sink).
- ``alpha_proxy``: the same from Gu et al.'s row-normalised proxy, with the slot's share in ``sink_mass_proxy``.
  For softmax without a slot the two are equal.

Shapes: B batch rows, H heads, Q queries, K keys, T tokens, D head dim.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sinkscope.collectors.base import Collector
from sinkscope.errors import InputError
from sinkscope.hooks import forward_hooks
from sinkscope.metrics.sink import alpha_from_sums, alpha_sums, row_normalised
from sinkscope.models.tinygpt import TinyGPT, attention_mask, rope


def has_slot(model: TinyGPT) -> bool:
    """Whether attention rows carry a sink slot: a key bias, a learnable sink token or softmax + 1."""
    cfg = model.cfg
    return bool(cfg.attn_bias in ("k", "kv") or cfg.sink_token or model.layers[0].attn.fn.virtual_sink)


def qk_cosines(q: Tensor, k: Tensor, visible: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sums of cos(q_t, k_first) and of the mean cos(q_t, k_j), j visible and j != first, over real queries.

    Same definition as `sinkscope.metrics.attention_stats` (first = position 0, right-padded rows): a query
    t != 0 counts when it sees at least one key other than the first. For the elu1 kinds these are cosines of
    the raw q and k, not of the kernel features phi(q), phi(k) the scores use.

    Args:
        q, k: ``(B, H, T, D)`` queries and keys as the scores use them (after RoPE).
        visible: ``(T, T)`` bool, query t may attend key j.
        valid: ``(B, T)`` bool, real tokens.
    Returns:
        ``cos_first (B, H)``, ``cos_other (B, H)`` (sums) and ``n (B,)`` (the number of queries summed).
    """
    qf, kf = q.float(), k.float()
    qn = qf / qf.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    kn = kf / kf.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    cos = qn @ kn.transpose(-1, -2)  # (B, H, T, T)
    vis = visible.to(cos.dtype)
    c_first = cos[..., 0]  # (B, H, T)
    first_seen = vis[:, 0]  # (T,)
    c_other = ((cos * vis).sum(-1) - c_first * first_seen) / (vis.sum(-1) - first_seen).clamp_min(1)
    n_other = visible.sum(-1) - visible[:, 0].long()  # (T,)
    t = torch.arange(visible.shape[0], device=visible.device)
    w = ((n_other > 0) & (t != 0))[None, :] & valid  # (B, T)
    wf = w[:, None, :].to(cos.dtype)
    return ((c_first * wf).sum(-1).double(), (c_other * wf).sum(-1).double(), w.sum(-1).double())


class TinyGPTCollector(Collector):
    """Collector of a `TinyGPT` (see `Collector`): hooks on its capture points.

    Args:
        model: the model.
        prefix_len: prefix-LM length passed to the model (the first ``prefix_len`` tokens attend
            bidirectionally, as in training with ``data.prefix_len``).
        fused, chunk_bytes, adapter: Hugging Face settings, ignored here (tinygpt computes its own weights).
    """

    name = "tinygpt"

    def __init__(self, model: TinyGPT, *, prefix_len: int = 0, fused: bool = True, chunk_bytes: int = 0,
                 adapter: Any = None) -> None:
        super().__init__()
        cfg = model.cfg
        self.model, self.cfg, self.prefix_len = model, cfg, int(prefix_len)
        if self.prefix_len < 0:
            raise InputError(f"prefix_len must be >= 0, got {prefix_len}")
        self.n_layers, self.attention_layers = cfg.n_layers, list(range(cfg.n_layers))
        self.n_heads = self.n_kv_heads = cfg.n_heads
        self.max_positions, self.context_name, self.vocab_size = cfg.block_size, "model.block_size", cfg.vocab_size
        self.provides.add("alpha_proxy")
        if has_slot(model):
            self.provides |= {"sink_mass", "sink_mass_proxy"}
        if not cfg.mlp:
            self.unavailable["mlp_top_*"] = "model.mlp is false: the blocks have no MLP (-1 / NaN)"
        self.visible: Tensor | None = None  # (T, T) bool, real queries x real keys
        self.pending: dict[int, dict[str, Tensor]] = {}

    @staticmethod
    def accepts(model: nn.Module) -> bool:
        return isinstance(model, TinyGPT)

    def model_info(self) -> dict[str, Any]:
        """The keys of `sinkscope.collectors.hf.model_info`, plus the attention kind and the config."""
        cfg, model = self.cfg, self.model
        src = getattr(model, "sinkscope_source", None)
        return {
            "name": "tinygpt", "source": src.to_json() if src is not None else {"kind": "object"},
            "model_type": "tinygpt", "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_heads,
            "d_model": cfg.d_model, "d_head": cfg.d_head, "positions": cfg.positions,
            "max_positions": cfg.block_size, "attention_layers": list(range(cfg.n_layers)),
            "learned_sinks": has_slot(model), "output_gate": False,
            "n_params": int(sum(p.numel() for p in model.parameters())), "attention": cfg.attention,
            "attention_normalised": bool(model.layers[0].attn.fn.normalised), "config": asdict(cfg),
        }

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        with forward_hooks(self.hooks()):
            yield

    def forward(self, ids: Tensor, mask: Tensor) -> None:
        T = ids.shape[1]
        self.visible = attention_mask(T, window=self.cfg.window, prefix_len=self.prefix_len, device=ids.device)
        self.pending = {}
        if self.prefix_len:
            self.model(ids, prefix_len=self.prefix_len)
        else:
            self.model(ids)

    def hooks(self) -> list[tuple[nn.Module, Any, bool]]:
        """``(module, fn, pre)`` forward hooks on every layer's capture points and projections."""
        hooks: list[tuple[nn.Module, Any, bool]] = []
        for l, block in enumerate(self.model.layers):
            a = block.attn
            hooks += [(a.qkv, lambda x, l=l: self._qkv(l, x), False),
                      (a.capture_weights, lambda x, l=l: self._store(l, "w", x), False),
                      (a.capture_slot, lambda x, l=l: self._store(l, "slot", x), False),
                      (a.capture_values, lambda x, l=l: self._values(l, x), False),
                      (a.proj, lambda x, l=l: self._head_out(l, x), True),
                      (block.capture_resid, lambda x, l=l: self.record_residual(l, x), False)]
            if block.mlp is not None:
                hooks.append((block.mlp.down, lambda x, l=l: self.record_mlp(l, self._real(x)), True))
        return hooks

    def _real(self, x: Tensor) -> Tensor:
        """Drop the learnable sink token's leading row(s): ``(B, S + T, ...)`` -> ``(B, T, ...)``."""
        return x[:, self.cfg.n_sink_tokens:]

    def _visible_on(self, device: torch.device) -> Tensor:
        assert self.visible is not None
        return self.visible.to(device)

    def _qkv(self, layer: int, x: Tensor) -> None:
        cfg = self.cfg
        B, TS = x.shape[0], x.shape[1]
        q, k, _ = x.detach().view(B, TS, 3, cfg.n_heads, cfg.d_head).permute(2, 0, 3, 1, 4)  # (B, H, S+T, D)
        if cfg.positions == "rope":  # as the layer does, over the sink token too
            q, k = rope(q, cfg.rope_theta), rope(k, cfg.rope_theta)
        S = cfg.n_sink_tokens
        cf, co, n = qk_cosines(q[:, :, S:], k[:, :, S:], self._visible_on(x.device), self.valid_on(x.device))
        self.pending.setdefault(layer, {}).update(cos_first=cf, cos_other=co, n_cos=n)

    def _store(self, layer: int, name: str, x: Tensor) -> None:
        self.pending.setdefault(layer, {})[name] = x.detach()

    def _values(self, layer: int, v: Tensor) -> None:
        """Last capture point of a layer: reduce its weights (and slot) to per-key records, then drop them."""
        p = self.pending.pop(layer)
        w, slot = p.pop("w").double(), p.pop("slot", None)  # (B, H, Q, K), (B, H, Q) | None
        valid, visible = self.valid_on(w.device), self._visible_on(w.device)
        qv = valid.double()  # (B, Q)
        n_q = qv.sum(-1).clamp_min(1)[:, None]  # (B, 1)
        wn, sn = row_normalised(w, None if slot is None else slot.double())
        colsum, count = alpha_sums(w, visible, valid)
        colsum_p, _ = alpha_sums(wn, visible, valid)
        n_cos = p.pop("n_cos").clamp_min(1)[:, None]
        rec = self.attn.setdefault(layer, {})
        rec.update(alpha=alpha_from_sums(colsum, count), alpha_proxy=alpha_from_sums(colsum_p, count),
                   value_norm=v.detach().float().norm(dim=-1),  # (B, H, K)
                   cos_first=p.pop("cos_first") / n_cos, cos_other=p.pop("cos_other") / n_cos)
        if slot is not None and sn is not None:
            rec["sink_mass"] = (slot.double() * qv[:, None]).sum(-1) / n_q
            rec["sink_mass_proxy"] = (sn * qv[:, None]).sum(-1) / n_q
        self.tick()

    def _head_out(self, layer: int, x: Tensor) -> None:
        """Input of W_O, ``(B, S + T, H * D)``: mean ||o_t|| per head over real queries."""
        o = self._real(x.detach().float())
        B, T = o.shape[:2]
        norm = o.view(B, T, self.cfg.n_heads, self.cfg.d_head).norm(dim=-1)  # (B, T, H)
        qv = self.valid_on(o.device).float()
        self.attn[layer]["out_norm"] = (norm * qv[:, :, None]).sum(1) / qv.sum(1, keepdim=True).clamp_min(1)


@dataclass
class Captured:
    """Everything tinygpt's capture points saw in the forward passes run under `capture_tinygpt` (one entry per
    layer and call): weights ``(B, H, Q, K)``, slots ``(B, H, Q)`` (only with a sink slot), values
    ``(B, H, K, D)`` and residual streams ``(B, T, d_model)``."""

    weights: list[Tensor] = field(default_factory=list)
    slots: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)
    resid: list[Tensor] = field(default_factory=list)


@contextlib.contextmanager
def capture_tinygpt(model: TinyGPT) -> Iterator[Captured]:
    """Keep (detached) what every capture point of ``model`` outputs; the hooks are removed on exit.

    Quadratic memory (every layer's weights): for references and small evaluation batches.
    """
    cap = Captured()
    hooks: list[tuple[nn.Module, Any, bool]] = []
    for block in model.layers:
        hooks += [(block.attn.capture_weights, lambda x: cap.weights.append(x.detach()), False),
                  (block.attn.capture_slot, lambda x: cap.slots.append(x.detach()), False),
                  (block.attn.capture_values, lambda x: cap.values.append(x.detach()), False),
                  (block.capture_resid, lambda x: cap.resid.append(x.detach()), False)]
    with forward_hooks(hooks):
        yield cap
