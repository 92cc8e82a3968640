"""Extreme-token metrics of a tinygpt during training, from the attention weights the model actually used.

:func:`measure_model` runs one evaluation batch with forward hooks on tinygpt's capture points
(``layers.{i}.attn.capture_weights`` / ``capture_slot`` / ``capture_values``, ``layers.{i}.capture_resid``) and
returns the row of ``metrics.jsonl``: loss, Sink_0 (eps 0.3) from the weights used and from Gu et al.'s
row-normalised proxy, the sink slot's share, attention on the first token per head, the first token's value and
residual norms relative to the median other token, and per head an active/dormant label per input class.

Definitions (RESEARCH.md §1): ``alpha[l, h, k] = mean over the queries t that can see k of A[l, h, t, k]``;
``Sink_k^eps = share of (l, h) with alpha[l, h, k] > eps``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sinkscope.models.attention import row_normalised
from sinkscope.models.tinygpt import TinyGPT, attention_mask
from sinkscope.tasks.batch import LMBatch

try:  # the foundation's definition, when present (one definition of Sink_k^eps in the project)
    from sinkscope.metrics.sink import sink_ratio as _foundation_sink_ratio  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the lead's module landing
    _foundation_sink_ratio = None


def column_alpha(weights: Tensor, visible: Tensor, queries: Tensor | None = None, *,
                 per_sample: bool = False) -> Tensor:
    """Per-head sink score of every key: mean attention ``k`` receives from the queries that can see it.

    Args:
        weights: attention weights ``(B, H, Q, K)``.
        visible: boolean visibility ``(Q, K)`` (causal / window / prefix mask).
        queries: optional ``(B, Q)`` bool selecting the queries to average over (e.g. an input class).
        per_sample: keep the batch dimension.
    Returns:
        ``alpha (H, K)``: sum over batch rows and visible selected queries of ``A[b, h, t, k]`` divided by their
        count (0 where no selected query sees ``k``); ``(B, H, K)`` with ``per_sample``.
    """
    B, H, Q, K = weights.shape
    sel = visible[None].expand(B, Q, K)
    if queries is not None:
        sel = sel & queries[:, :, None]
    selw = sel[:, None].to(weights.dtype)  # (B, 1, Q, K)
    if per_sample:
        return (weights * selw).sum(dim=2) / selw.sum(dim=2).clamp_min(1)  # (B, H, K)
    num = (weights * selw).sum(dim=(0, 2))  # (H, K)
    den = selw.sum(dim=(0, 2)).clamp_min(1)  # (1, K)
    return num / den


def sink_ratio(alpha: Tensor, eps: float = 0.3) -> float:
    """``Sink^eps``: share of heads (and samples) whose ``alpha`` exceeds ``eps``.

    ``alpha`` holds one key's scores, ``(L, H)`` or per sample ``(L, B, H)``: Gu et al. threshold each sample's
    alpha and average the indicator over samples, layers and heads.
    """
    if _foundation_sink_ratio is not None:
        return float(_foundation_sink_ratio(alpha, eps=eps))
    return float((alpha > eps).float().mean())


def norm_ratio(x: Tensor) -> float:
    """First position's norm over the median norm of the other positions: ``x (B, T, D)`` -> scalar.

    Numerator: mean over rows of ``||x[b, 0]||``; denominator: median over rows and positions ``t >= 1``.
    """
    n = x.norm(dim=-1)  # (B, T)
    return float(n[:, 0].mean() / n[:, 1:].median().clamp_min(1e-12))


@dataclass
class _Captured:
    weights: list[Tensor] = field(default_factory=list)
    slots: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)
    resid: list[Tensor] = field(default_factory=list)


@contextmanager
def capture_tinygpt(model: TinyGPT) -> Iterator[_Captured]:
    """Forward hooks on every capture point of ``model``; removed on exit."""
    cap = _Captured()
    handles = []

    def keep(store: list[Tensor]):
        return lambda _m, _inp, out: store.append(out.detach())

    try:
        for block in model.layers:
            handles.append(block.attn.capture_weights.register_forward_hook(keep(cap.weights)))
            handles.append(block.attn.capture_slot.register_forward_hook(keep(cap.slots)))
            handles.append(block.attn.capture_values.register_forward_hook(keep(cap.values)))
            handles.append(block.capture_resid.register_forward_hook(keep(cap.resid)))
        yield cap
    finally:
        for h in handles:
            h.remove()


def masked_loss(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the masked positions: logits ``(B, T, V)``, targets/mask ``(B, T)``."""
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    return (nll * mask).sum() / mask.sum().clamp_min(1)


@torch.no_grad()
def measure_model(model: nn.Module, batch: LMBatch, *, eps: float = 0.3, dormant_threshold: float = 0.5) -> dict:
    """One evaluation row (see module docstring). ``model`` is a :class:`TinyGPT` (unwrapped)."""
    assert isinstance(model, TinyGPT)
    was_training = model.training
    model.eval()
    with capture_tinygpt(model) as cap:
        logits = model(batch.idx, prefix_len=batch.prefix_len)
    model.train(was_training)
    cfg = model.cfg
    T = batch.idx.shape[1]
    nll = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="none").view_as(batch.targets)
    mask = batch.loss_mask
    row: dict = {"loss": float((nll * mask).sum() / mask.sum().clamp_min(1))}
    for name, part in batch.parts.items():
        sel = part & mask
        row[f"loss_{name}"] = float((nll * sel).sum() / sel.sum().clamp_min(1))
    if batch.oracle_nll is not None:
        row["excess_loss"] = row["loss"] - float((batch.oracle_nll * mask).sum() / mask.sum().clamp_min(1))

    visible = attention_mask(T, window=cfg.window, prefix_len=batch.prefix_len, device=batch.idx.device)
    alpha0, alpha0_proxy, slot_alpha, slot_proxy = [], [], [], []  # per layer, (B, H) each
    heads: dict[str, dict[str, str]] = {}
    head_mass: dict[str, dict[str, float]] = {}
    for layer, w in enumerate(cap.weights):  # w: (B, H, Q, K)
        slot = cap.slots[layer] if cap.slots else None  # (B, H, Q)
        alpha0.append(column_alpha(w, visible, per_sample=True)[..., 0])
        wn, sn = row_normalised(w, slot)
        alpha0_proxy.append(column_alpha(wn, visible, per_sample=True)[..., 0])
        if slot is not None:  # the slot is visible to every query
            slot_alpha.append(slot.mean(dim=2))
            slot_proxy.append(sn.mean(dim=2))
        for cls, queries in batch.classes.items():
            mass = column_alpha(wn, visible, queries)[:, 0]  # (H,) attention of this class's queries on token 0
            if slot is not None:  # a bias slot / sink token is where a dormant head parks its attention
                q = queries[:, None, :].to(w.dtype)
                mass = mass + (sn * q).sum(dim=(0, 2)) / q.sum().clamp_min(1)
            for h, m in enumerate(mass.tolist()):
                key = f"L{layer}H{h}"
                head_mass.setdefault(key, {})[cls] = round(m, 4)
                heads.setdefault(key, {})[cls] = "dormant" if m > dormant_threshold else "active"
    a0, a0p = torch.stack(alpha0), torch.stack(alpha0_proxy)  # (L, B, H)
    row["sink_ratio"] = sink_ratio(a0, eps)
    row["sink_ratio_proxy"] = sink_ratio(a0p, eps)
    if slot_alpha:
        sa, sp = torch.stack(slot_alpha), torch.stack(slot_proxy)  # (L, B, H)
        row["sink_ratio_slot"] = sink_ratio(sa, eps)
        row["sink_ratio_slot_proxy"] = sink_ratio(sp, eps)
        row["slot_attention"] = [[round(v, 4) for v in a.tolist()] for a in sa.mean(1)]
    # per layer, per head: alpha_0 averaged over the evaluation sequences
    row["bos_attention"] = [[round(v, 4) for v in a.tolist()] for a in a0.mean(1)]
    row["bos_attention_proxy"] = [[round(v, 4) for v in a.tolist()] for a in a0p.mean(1)]
    # value vectors of all heads concatenated per token: (B, H, K, D) -> (B, K, H*D)
    row["bos_value_norm"] = [round(norm_ratio(v.transpose(1, 2).flatten(2)), 4) for v in cap.values]
    row["bos_residual_norm"] = [round(norm_ratio(x), 4) for x in cap.resid]
    # absolute norms (Guo et al. plot these): mean ||x[l, b, 0]|| and the median ||x[l, b, t]||, t >= 1
    row["bos_residual_abs"] = [round(float(x[:, 0].norm(dim=-1).mean()), 4) for x in cap.resid]
    row["median_residual_abs"] = [round(float(x[:, 1:].norm(dim=-1).median()), 4) for x in cap.resid]
    row["heads"] = heads
    row["head_bos_mass"] = head_mass
    return row
