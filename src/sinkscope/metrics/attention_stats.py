"""Column statistics of causal attention, computed in query chunks so memory stays linear in T.

This is the one place where attention probabilities are formed. For one layer it computes (optionally) the
attention output and accumulates, per key, the attention mass it receives from the real queries that can see it,
plus per-head query/key alignment and output norms, without ever holding the (B, H, T, T) matrix.

Shapes: B batch, H query heads, G = H / Hkv (GQA group size), Q query positions, K key positions, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Bytes of fp32 scores a chunk may hold (B*H*C*K*4); a few copies of a 16 MiB chunk stay well under the
#: memory of the forward itself (MLP activations) at every length.
DEFAULT_CHUNK_BYTES = 16 * 2**20


@dataclass
class LayerAttentionStats:
    """Sums accumulated over the real queries of one layer (divide to get means).

    Attributes:
        colsum: (B, H, K) float64, sum over queries t of A[t, k].
        count: (B, K) float64, number of real queries that can see key k (the alpha denominator).
        n_queries: (B,) float64, number of real queries.
        sink_mass: (B, H) float64, sum over queries of the learned sink's probability (None without one).
        cos_first: (B, H) float64, sum over queries t != first of cos(q_t, k_first).
        cos_other: (B, H) float64, sum over queries t != first of the mean cos(q_t, k_j), j visible, j != first.
        n_cos: (B,) float64, number of queries in the two cosine sums.
        out_norm: (B, H) float64, sum over queries of ||o_t||, the head's output before W_O.
        value_norm: (B, Hkv, K) float32, ||v_k|| per key/value head.
        first: (B,) long, index of the first real key of each row.
    """

    colsum: Tensor
    count: Tensor
    n_queries: Tensor
    sink_mass: Tensor | None
    cos_first: Tensor
    cos_other: Tensor
    n_cos: Tensor
    out_norm: Tensor
    value_norm: Tensor
    first: Tensor

    @property
    def alpha(self) -> Tensor:
        """(B, H, K) mean attention each key receives from the queries that see it (NaN where none do)."""
        return self.colsum / self.count[:, None, :]


def _visible_chunk(
    mask: Tensor | None, q_pos: Tensor, k_pos: Tensor, q_sl: slice, k_end: int, window: int | None
) -> tuple[Tensor, Tensor | None]:
    """Boolean visibility (B|1, 1, C, k_end) for a query chunk and the additive float mask if one was given."""
    if mask is None:
        vis = k_pos[None, :k_end] <= q_pos[q_sl, None]
        if window is not None:
            vis = vis & (q_pos[q_sl, None] - k_pos[None, :k_end] < window)
        return vis[None, None], None
    m = mask[:, :, q_sl, :k_end]
    if m.dtype == torch.bool:
        return m, None
    return m > torch.finfo(m.dtype).min / 2, m


def attention_with_stats(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    scaling: float,
    mask: Tensor | None = None,
    query_valid: Tensor | None = None,
    key_valid: Tensor | None = None,
    softcap: float | None = None,
    sink_logits: Tensor | None = None,
    sliding_window: int | None = None,
    compute_output: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[Tensor | None, LayerAttentionStats]:
    """Exact softmax attention in query chunks, with per-key column statistics.

    Args:
        query: (B, H, Q, D) after RoPE / q-norm, as the model feeds its attention function.
        key: (B, Hkv, K, D) likewise; Q <= K (the last Q keys are the queries' own positions).
        value: (B, Hkv, K, D).
        scaling: multiplier of q.k.
        mask: None (plain causal, with ``sliding_window`` applied), a boolean (B|1, 1, Q, K) mask where True
            means "may attend", or an additive float mask, as transformers builds them.
        query_valid: (B, Q) bool, real (non-padding) queries; default all.
        key_valid: (B, K) bool, real keys (to locate each row's first real token); default all.
        softcap: Gemma-2 style logit soft-capping ``c * tanh(s / c)``.
        sink_logits: (H,) learned per-head sink logits (gpt-oss): a virtual key with no value.
        sliding_window: window size (only used when ``mask`` is None).
        compute_output: also return the attention output (B, Q, H, D) (the layout HF attention functions return).
        chunk_bytes: budget for one chunk of fp32 scores.

    Returns:
        ``(output or None, LayerAttentionStats)``.
    """
    B, H, Q, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    G = H // Hkv
    device = query.device
    offset = K - Q
    q_pos = torch.arange(offset, K, device=device)
    k_pos = torch.arange(K, device=device)
    if query_valid is None:
        query_valid = torch.ones(B, Q, dtype=torch.bool, device=device)
    if key_valid is None:
        key_valid = torch.ones(B, K, dtype=torch.bool, device=device)
    first = key_valid.float().argmax(dim=1)  # (B,)

    k_full = key.repeat_interleave(G, dim=1).float() if G > 1 else key.float()  # (B, H, K, D)
    v_full = value.repeat_interleave(G, dim=1).float() if G > 1 else value.float()
    qf = query.float()
    inv_q_norm = 1.0 / qf.norm(dim=-1).clamp_min(1e-30)  # (B, H, Q)
    inv_k_norm = 1.0 / k_full.norm(dim=-1).clamp_min(1e-30)  # (B, H, K)
    k_unit = k_full * inv_k_norm[..., None]  # (B, H, K, D) unit keys
    # plain causal attention: the unit keys a query sees are a prefix, so their sum is a cumulative sum
    k_unit_prefix = k_unit.cumsum(dim=2) if mask is None and sliding_window is None else None
    q_scaled = qf * scaling

    f64 = torch.float64
    colsum = torch.zeros(B, H, K, dtype=f64, device=device)
    count = torch.zeros(B, K, dtype=f64, device=device)
    sink_mass = torch.zeros(B, H, dtype=f64, device=device) if sink_logits is not None else None
    cos_first = torch.zeros(B, H, dtype=f64, device=device)
    cos_other = torch.zeros(B, H, dtype=f64, device=device)
    n_cos = torch.zeros(B, dtype=f64, device=device)
    out_norm = torch.zeros(B, H, dtype=f64, device=device)
    output = torch.empty(B, Q, H, D, dtype=query.dtype, device=device) if compute_output else None
    bidx = torch.arange(B, device=device)

    chunk = max(1, int(chunk_bytes // max(1, B * H * K * 4)))
    for start in range(0, Q, chunk):
        stop = min(Q, start + chunk)
        q_sl = slice(start, stop)
        k_end = min(K, offset + stop)  # keys after the chunk's last query are never visible (causal)
        vis, additive = _visible_chunk(mask, q_pos, k_pos, q_sl, k_end, sliding_window)
        scores = torch.matmul(q_scaled[:, :, q_sl], k_full[:, :, :k_end].transpose(-1, -2))  # (B, H, C, k_end)
        vis_b = vis.expand(B, 1, stop - start, k_end)[:, 0]  # (B, C, k_end)
        qv = query_valid[:, q_sl].to(scores.dtype)  # (B, C)

        # q-k alignment, cos = q.k / (|q| |k|): the first key vs the mean over the other visible keys.
        # sum_k vis[t, k] cos(q_t, k) = q_t . (sum of the visible unit keys) / |q_t|
        inv_q = inv_q_norm[:, :, q_sl]  # (B, H, C)
        fi = first.clamp_max(k_end - 1)
        c_first = scores[bidx, :, :, fi] / scaling * inv_q * inv_k_norm[bidx, :, fi][:, :, None]  # (B, H, C)
        if k_unit_prefix is not None:
            seen = k_unit_prefix[:, :, q_pos[q_sl]]  # (B, H, C, D)
        else:
            seen = torch.matmul(vis_b[:, None].to(scores.dtype), k_unit[:, :, :k_end])  # (B, H, C, D)
        first_seen = vis_b[bidx, :, fi] & (first < k_end)[:, None]  # (B, C): query sees the first key
        c_sum = (qf[:, :, q_sl] * seen).sum(-1) * inv_q  # (B, H, C)
        c_other = c_sum - c_first * first_seen[:, None, :].to(scores.dtype)
        n_other = vis_b.sum(-1) - first_seen.long()  # (B, C)
        c_other = c_other / n_other.clamp_min(1)[:, None, :].to(scores.dtype)
        w = ((n_other > 0) & (q_pos[q_sl][None, :] != first[:, None]) & query_valid[:, q_sl]).to(scores.dtype)
        cos_first += (c_first * w[:, None, :]).sum(-1).to(f64)
        cos_other += (c_other * w[:, None, :]).sum(-1).to(f64)
        n_cos += w.sum(-1).to(f64)

        if softcap is not None:
            scores = scores.div_(softcap).tanh_().mul_(softcap)
        if additive is not None:
            scores = scores.add_(additive)
        scores = scores.masked_fill_(~vis, float("-inf"))
        if sink_logits is not None:
            sink = sink_logits.float().view(1, H, 1, 1).expand(B, H, stop - start, 1)
            full = torch.cat([scores, sink], dim=-1)
            full = full - full.amax(dim=-1, keepdim=True)
            probs_all = torch.softmax(full, dim=-1)
            probs, sink_p = probs_all[..., :-1], probs_all[..., -1]
        else:
            probs = torch.softmax(scores, dim=-1)
            sink_p = None
        del scores
        row_ok = vis.any(-1, keepdim=True)  # rows with no visible key give NaN: they attend nowhere
        if not bool(row_ok.all()):
            probs = probs.masked_fill(~row_ok, 0.0)

        colsum[:, :, :k_end] += torch.einsum("bhck,bc->bhk", probs, qv).to(f64)
        count[:, :k_end] += torch.einsum("bck,bc->bk", vis_b.to(probs.dtype), qv).to(f64)
        if sink_p is not None and sink_mass is not None:
            sink_mass += (sink_p * qv[:, None, :]).sum(-1).to(f64)

        out = torch.matmul(probs, v_full[:, :, :k_end])  # (B, H, C, D)
        out_norm += (out.norm(dim=-1) * qv[:, None, :]).sum(-1).to(f64)
        if output is not None:
            output[:, q_sl] = out.transpose(1, 2).to(output.dtype)

    value_norm = value.float().norm(dim=-1)  # (B, Hkv, K)
    n_queries = query_valid.sum(-1).to(f64)
    stats = LayerAttentionStats(colsum, count, n_queries, sink_mass, cos_first, cos_other, n_cos, out_norm,
                                value_norm, first)
    return output, stats
