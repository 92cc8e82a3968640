"""Why a trained tinygpt head does (not) sink: raw attention scores and the first token's residual parts.

Two read-outs of a finished ``sinkscope train`` run (its ``checkpoint.pt``) on the run's own held-out batch:

- :func:`score_budget`: for one layer, the raw score ``s = f(q.k / sqrt d)`` (before any row normalisation)
  that the queries of each class give the first token and the sum they give all other keys, by query position.
  For normalised sigmoid the first token's share is ``s_0 / (s_0 + sum_k s_k)``: a sink needs the sum of the
  other sigmoids, which grows with the number of keys, to fall below ``s_0 <= 1``.
- :func:`residual_parts`: for one layer, the norms of what the block adds to the residual stream, at the first
  position and at the median other position: the block input, the attention output, the MLP output and the
  sum. It shows which part makes the first token's residual norm stand out (for ReLU attention with
  ``1 / (t + 1)``, position 0's single attention term is never divided).
- :func:`attention_targets`: where one layer's queries of each class put their (row-normalised) attention:
  the sink slot, the first token, themselves, the previous token, everything else.

``sinkscope train diagnose scores|parts|targets RUN... [--layer L]`` prints one JSON line per run (`diagnose_run`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sinkscope.errors import InputError
from sinkscope.models.tinygpt import TinyGPT, rope

#: raw score of a logit per attention kind, before any row normalisation (kinds whose weights are a function
#: of ``q.k / sqrt d`` alone)
RAW_SCORES = {
    "softmax": torch.exp, "softmax1": torch.exp, "sigmoid": torch.sigmoid, "sigmoid_norm": torch.sigmoid,
    "relu": F.relu, "relu_flat": F.relu,
}


def run_inputs(run: str | Path) -> tuple[TinyGPT, Any, Any]:
    """A finished run's model (eval mode), resolved config and held-out evaluation batch (as training used)."""
    from sinkscope.training.loop import build_task, evaluation_batch, resolve_config
    from sinkscope.training.run import load_trained

    model, cfg = load_trained(run)
    task = build_task(cfg.data)
    cfg = resolve_config(cfg, task)
    return model, cfg, evaluation_batch(task, cfg)


def _check_layer(model: TinyGPT, layer: int) -> None:
    if not 0 <= layer < model.cfg.n_layers:
        raise InputError(f"layer {layer} is outside the model's {model.cfg.n_layers} layers")


@torch.no_grad()
def layer_logits(model: TinyGPT, idx: Tensor, layer: int) -> Tensor:
    """Attention logits ``q.k / sqrt(d)`` of ``layer`` on real keys, ``(B, H, T, T)`` (RoPE applied; no slot)."""
    _check_layer(model, layer)
    cfg = model.cfg
    if cfg.positions == "alibi" or cfg.sink_token or cfg.attn_bias in ("k", "kv"):
        raise InputError("score_budget supports models without ALiBi, sink token or key bias")
    seen: list[Tensor] = []
    handle = model.layers[layer].attn.qkv.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        model(idx)
    finally:
        handle.remove()
    B, T = idx.shape
    q, k, _ = seen[0].view(B, T, 3, cfg.n_heads, cfg.d_head).permute(2, 0, 3, 1, 4)
    if cfg.positions == "rope":
        q, k = rope(q, cfg.rope_theta), rope(k, cfg.rope_theta)
    return q @ k.transpose(-1, -2) / math.sqrt(cfg.d_head)


def score_budget(model: TinyGPT, batch: Any, layer: int, *, buckets: int = 4) -> dict[str, Any]:
    """Raw scores on the first token vs all other keys, per query class and position bucket (see module doc).

    Returns ``{"kind", "layer", "classes": {cls: [bucket rows]}}``; a bucket row has the query positions, the
    mean logit on key 0 and on the other visible keys, the mean raw score ``s_0``, the mean sum ``S`` of the
    raw scores on the other keys, the mean share ``s_0 / (s_0 + S)`` and the mean share of the weights as used.
    """
    kind = model.cfg.attention
    if kind not in RAW_SCORES:
        raise InputError(f"score_budget: no raw score for attention kind {kind!r} (known: {', '.join(RAW_SCORES)})")
    z = layer_logits(model, batch.idx, layer)  # (B, H, T, T)
    B, H, T, _ = z.shape
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    s = RAW_SCORES[kind](z) * causal
    others = causal.clone()
    others[:, 0] = False  # keys 1..t
    s0, s_rest = s[..., 0], (s * others).sum(-1)  # (B, H, T)
    n_other = others.sum(-1).clamp_min(1)  # (T,)
    z0, z_rest = z[..., 0], (z * others).sum(-1) / n_other
    share = s0 / (s0 + s_rest).clamp_min(1e-30)
    edges = torch.linspace(1, T, buckets + 1).round().long().tolist()
    out: dict[str, Any] = {"kind": kind, "layer": layer, "seq_len": T, "classes": {}}
    for cls, queries in batch.classes.items():
        rows = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            sel = queries.clone()
            sel[:, :lo] = False
            sel[:, hi:] = False  # query positions lo..hi-1
            if not sel.any():
                continue
            m = sel[:, None, :].expand(B, H, T)

            def mean(x: Tensor, m: Tensor = m) -> float:
                return round(float(x[m].mean()), 4)

            rows.append({"positions": f"{lo}-{hi - 1}", "logit_first": mean(z0), "logit_others": mean(z_rest),
                         "score_first": mean(s0), "score_others_sum": mean(s_rest), "share_first": mean(share)})
        out["classes"][cls] = rows
    return out


@torch.no_grad()
def residual_parts(model: TinyGPT, batch: Any, layer: int) -> dict[str, Any]:
    """Norms of the block input, attention output, MLP output and block output of ``layer`` at position 0 and
    the median over positions ``t >= 1`` (pre-norm blocks; means over the batch for position 0)."""
    _check_layer(model, layer)
    if model.cfg.norm_position != "pre" or model.cfg.sink_token:
        raise InputError("residual_parts supports pre-norm models without a sink token")
    block = model.layers[layer]
    got: dict[str, Tensor] = {}
    hooks = [block.register_forward_pre_hook(lambda _m, args: got.__setitem__("input", args[0])),
             block.attn.register_forward_hook(lambda _m, _i, out: got.__setitem__("attention", out)),
             block.register_forward_hook(lambda _m, _i, out: got.__setitem__("output", out))]
    if block.mlp is not None:
        hooks.append(block.mlp.register_forward_hook(lambda _m, _i, out: got.__setitem__("mlp", out)))
    try:
        model(batch.idx)
    finally:
        for h in hooks:
            h.remove()
    parts = {}
    for name in ("input", "attention", "mlp", "output"):
        if name in got:
            n = got[name].norm(dim=-1)  # (B, T)
            first, median = float(n[:, 0].mean()), float(n[:, 1:].median())
            parts[name] = {"first": round(first, 3), "median_other": round(median, 3),
                           "ratio": round(first / max(median, 1e-12), 3)}
    return {"kind": model.cfg.attention, "layer": layer, "parts": parts}


@torch.no_grad()
def attention_targets(model: TinyGPT, batch: Any, layer: int) -> dict[str, Any]:
    """Mean share of the attention of ``layer``'s queries (positions >= 1) of each class on the sink slot, the
    first token, the query itself, the previous token and the rest (Gu et al.'s row-normalised proxy, so the
    shares sum to one, or to zero for a ReLU row that attends nowhere), averaged over heads."""
    from sinkscope.collectors.tinygpt import capture_tinygpt
    from sinkscope.metrics.sink import row_normalised

    _check_layer(model, layer)
    with capture_tinygpt(model) as cap:
        model(batch.idx)
    w, slot = row_normalised(cap.weights[layer], cap.slots[layer] if cap.slots else None)  # (B, H, T, T)
    B, H, T, _ = w.shape
    t = torch.arange(T)
    first = w[..., 0]
    own = w[..., t, t]
    prev = torch.zeros_like(own)
    prev[..., 2:] = w[..., t[2:], t[2:] - 1]  # the previous token, when it is not the first one
    own[..., 0] = 0.0  # query 0's own key is the first token
    slot_share = slot if slot is not None else torch.zeros_like(own)
    rest = (w.sum(-1) - first - own - prev).clamp_min(0)
    out: dict[str, Any] = {"kind": model.cfg.attention, "layer": layer, "classes": {}}
    for cls, queries in batch.classes.items():
        sel = queries.clone()
        sel[:, 0] = False
        m = sel[:, None, :].expand(B, H, T)
        out["classes"][cls] = {name: round(float(x[m].mean()), 4) for name, x in
                               (("slot", slot_share), ("first", first), ("self", own), ("previous", prev),
                                ("rest", rest))}
    return out



#: the diagnoses of ``sinkscope train diagnose WHAT``: name -> (function, default layer)
DIAGNOSES = {"scores": (score_budget, 1), "parts": (residual_parts, 0), "targets": (attention_targets, 1)}


def diagnose_run(what: str, run: str | Path, layer: int | None = None) -> dict[str, Any]:
    """One diagnosis (``scores``: `score_budget`, ``parts``: `residual_parts`, ``targets``:
    `attention_targets`) of a finished run on its own held-out batch; ``layer`` None: the diagnosis's default
    (1 for scores and targets, 0 for parts). Returns ``{"run": ..., **result}``."""
    if what not in DIAGNOSES:
        raise InputError(f"unknown diagnosis {what!r}; choose from {', '.join(DIAGNOSES)}")
    fn, default_layer = DIAGNOSES[what]
    model, _cfg, batch = run_inputs(run)
    return {"run": str(run), **fn(model, batch, default_layer if layer is None else layer)}
