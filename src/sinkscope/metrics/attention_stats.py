"""Column statistics of causal attention per layer, in linear memory: fused kernels, or exact query chunks.

This is the one place where attention probabilities are summarised. For one layer it computes (optionally) the
attention output and accumulates, per key, the attention mass it receives from the real queries that can see it,
plus per-head query/key alignment and output norms, without ever holding the (B, H, T, T) matrix.

Two methods give the same numbers (to ~1e-6 in fp32):

- ``"fused"`` (the default): two passes per layer (`sinkscope.metrics.attention_fused`): the backend's fused
  attention kernel (the one SDPA runs) gives the output and each query's log-sum-exp, then blocked matrix
  products give the column sums ``sum_q exp(s_qk - lse_q)`` without a value product; the cosine statistics come
  from prefix sums of unit keys, the visibility counts in closed form. Used for plain causal attention and
  sliding windows, with or without learned sinks, when the mask is None or, on every real query's row, allows
  exactly the causal (windowed) keys (right padding: real queries never see a padded key). Each mask object is
  checked once (transformers passes the same one to every layer of a forward).
- ``"chunked"``: the reference. Scores materialised in query chunks of ``chunk_bytes``. The fused method falls
  back to it for soft-capped scores (Gemma-2), any other mask (left padding, additive biases, per-head masks),
  fewer queries than keys, devices without a fused kernel (only CPU and CUDA have one), and any input the fused
  kernel refuses (e.g. an older torch); ``LayerAttentionStats.method`` says which one ran.

Shapes: B batch, H query heads, G = H / Hkv (GQA group size), Q query positions, K key positions, D head dim.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from sinkscope.errors import InputError
from sinkscope.metrics.attention_fused import FusedUnavailable, attention_lse, softmax_column_sums

#: Bytes of fp32 scores a chunk may hold (B*H*C*K*4); a few copies of a 16 MiB chunk stay well under the
#: memory of the forward itself (MLP activations) at every length.
DEFAULT_CHUNK_BYTES = 16 * 2**20

#: The ways `attention_with_stats` can compute the statistics.
METHODS = ("fused", "chunked")


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
        method: ``"fused"`` or ``"chunked"``, the method that computed these sums.
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
    method: str = "chunked"

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
    method: str = "fused",
) -> tuple[Tensor | None, LayerAttentionStats]:
    """Exact softmax attention with per-key column statistics, in memory linear in the sequence length.

    Args:
        query: (B, H, Q, D) after RoPE / q-norm, as the model feeds its attention function.
        key: (B, Hkv, K, D) likewise; Q <= K (the last Q keys are the queries' own positions).
        value: (B, Hkv, K, D).
        scaling: multiplier of q.k.
        mask: None (plain causal, with ``sliding_window`` applied), a boolean (B|1, 1, Q, K) mask where True
            means "may attend", or an additive float mask, as transformers builds them.
        query_valid: (B, Q) bool, real (non-padding) queries; default all. Only they enter the statistics.
        key_valid: (B, K) bool, real keys (to locate each row's first real token); default all.
        softcap: Gemma-2 style logit soft-capping ``c * tanh(s / c)`` (always the chunked method).
        sink_logits: (H,) learned per-head sink logits (gpt-oss): a virtual key with no value.
        sliding_window: window size: query q sees key k when ``0 <= q - k < sliding_window`` (with ``mask`` None;
            with a mask, the fused method checks the mask against it).
        compute_output: also return the attention output (B, Q, H, D) (the layout HF attention functions return),
            in ``query``'s dtype. With the fused method, a padding query (``query_valid`` False) gets plain causal
            (windowed) attention over every earlier key, padded ones included, whatever ``mask`` says: under
            right padding nothing at a real position depends on it.
        chunk_bytes: budget for one chunk of fp32 scores (the chunked method; the fused one sizes its blocks
            for the cache).
        method: ``"fused"`` (where it applies, else chunked: see the module docstring) or ``"chunked"``.

    Returns:
        ``(output or None, LayerAttentionStats)``; the statistics are fp32/fp64 on ``query``'s device whatever
        the input dtype.

    Raises:
        InputError: an unknown ``method``.
    """
    if method not in METHODS:
        raise InputError(f"unknown attention statistics method {method!r}; expected one of {', '.join(METHODS)}")
    if method == "fused":
        window = _fused_window(query, key, mask, query_valid, softcap, sliding_window)
        if window is not False:
            try:
                return _fused(query, key, value, scaling=scaling, query_valid=query_valid, key_valid=key_valid,
                              sink_logits=sink_logits, window=window, compute_output=compute_output,
                              head_bytes=chunk_bytes)
            except FusedUnavailable:
                pass
    return _chunked(query, key, value, scaling=scaling, mask=mask, query_valid=query_valid, key_valid=key_valid,
                    softcap=softcap, sink_logits=sink_logits, sliding_window=sliding_window,
                    compute_output=compute_output, chunk_bytes=chunk_bytes)


#: (mask, query_valid, (versions, window), verdict): whether a mask still alive is causal (windowed) on the real
#: rows; transformers passes one mask object to every layer of a forward, so each is checked once.
_MASK_CHECKS: list[tuple[weakref.ref, weakref.ref | None, tuple[int | None, int | None, int | None], bool]] = []


def _fused_window(query: Tensor, key: Tensor, mask: Tensor | None, query_valid: Tensor | None,
                  softcap: float | None, sliding_window: int | None) -> int | None | bool:
    """The window the fused method applies (None: plain causal), or False where it does not apply."""
    Q, K = query.shape[2], key.shape[2]
    if softcap or Q != K or Q == 0 or query.shape[1] % key.shape[1]:
        return False
    window = int(sliding_window) if sliding_window and sliding_window < K else None
    if mask is None:
        return window
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2:] != (Q, K):
        return False
    key_ = (_version(mask), None if query_valid is None else _version(query_valid), window)
    for m_ref, v_ref, k_, ok in _MASK_CHECKS:
        if m_ref() is mask and (v_ref() if v_ref is not None else None) is query_valid and k_ == key_:
            return window if ok else False
    ok = _mask_is_causal(mask, query_valid, window)
    if key_[0] is not None and (query_valid is None or key_[1] is not None):
        _MASK_CHECKS[:] = [c for c in _MASK_CHECKS if c[0]() is not None][-7:]
        _MASK_CHECKS.append((weakref.ref(mask), None if query_valid is None else weakref.ref(query_valid), key_, ok))
    return window if ok else False


def _version(t: Tensor) -> int | None:
    """The tensor's in-place version counter (None for inference-mode tensors, which have none)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _mask_is_causal(mask: Tensor, query_valid: Tensor | None, window: int | None) -> bool:
    """True when ``mask`` (B|1, 1, T, T), on every real query's row, allows exactly the keys ``0 <= q - k <
    window`` (a float mask: 0 there and <= finfo.min / 2 elsewhere). Checked in blocks of rows."""
    T = mask.shape[-1]
    pos = torch.arange(T, device=mask.device)
    rows = max(1, 2**22 // max(1, mask.shape[0] * T))
    for r0 in range(0, T, rows):
        r1 = min(T, r0 + rows)
        m = mask[:, 0, r0:r1]  # (B|1, n, T)
        if m.dtype == torch.bool:
            vis = m
        else:
            vis = m > torch.finfo(m.dtype).min / 2
            if bool((m.masked_fill(~vis, 0) != 0).any()):
                return False  # an additive bias, not a mask
        d = pos[r0:r1, None] - pos[None, :]  # (n, T) q - k
        want = (d >= 0) if window is None else (d >= 0) & (d < window)
        bad = vis != want
        if query_valid is not None:
            bad = bad & query_valid[:, r0:r1, None]
        if bool(bad.any()):
            return False
    return True


def _fused(query: Tensor, key: Tensor, value: Tensor, *, scaling: float, query_valid: Tensor | None,
           key_valid: Tensor | None, sink_logits: Tensor | None, window: int | None, compute_output: bool,
           head_bytes: int) -> tuple[Tensor | None, LayerAttentionStats]:
    """The fused method for causal (windowed) attention over T = Q = K positions (see the module docstring)."""
    B, H, T, D = query.shape
    Hkv = key.shape[1]
    G = H // Hkv
    device = query.device
    f64 = torch.float64
    if query_valid is None:
        query_valid = torch.ones(B, T, dtype=torch.bool, device=device)
    if key_valid is None:
        key_valid = torch.ones(B, T, dtype=torch.bool, device=device)
    first = key_valid.float().argmax(dim=1)  # (B,)
    qf, kf, vf = query.float(), key.float(), value.float()

    out, lse = attention_lse(qf, kf, vf, scaling, window)  # (B, H, T, D), (B, H, T)
    sink_mass = None
    if sink_logits is not None:  # the sink logit joins each row's normaliser; its mass is exp(s_h - lse)
        s = sink_logits.float().to(device).view(1, H, 1)
        lse_all = torch.logaddexp(lse, s)
        out = out * torch.exp(lse - lse_all)[..., None]
        sink_mass = (torch.exp(s - lse_all) * query_valid[:, None, :]).sum(-1).to(f64)
        lse = lse_all
    colsum = softmax_column_sums(qf, kf, lse, scaling, query_weight=query_valid, window=window,
                                 head_bytes=head_bytes)
    qv = query_valid.to(f64)
    out_norm = (out.norm(dim=-1) * query_valid[:, None, :]).sum(-1).to(f64)  # (B, H)

    # count[k]: real queries q with 0 <= q - k < window, from the suffix sums of query_valid
    suffix = qv.flip(-1).cumsum(-1).flip(-1)  # (B, T) sum over q >= k
    count = suffix if window is None else suffix - torch.nn.functional.pad(suffix[:, window:], (0, window))

    # cosines: sum over the visible keys of cos(q, k) = q . (sum of the visible unit keys) / |q|, a prefix sum
    inv_q = 1.0 / qf.norm(dim=-1).clamp_min(1e-30)  # (B, H, T)
    k_unit = kf / kf.norm(dim=-1, keepdim=True).clamp_min(1e-30)  # (B, Hkv, T, D)
    if window is None:  # (CPU cumsum accumulates fp32 in fp64; CUDA's scan adds ~log2(T) roundings)
        seen = k_unit.cumsum(2)
    else:  # a difference of prefix sums: in fp64, or the cancellation would cost ~T / window roundings
        prefix = k_unit.to(f64).cumsum(2)
        seen = (prefix - torch.nn.functional.pad(prefix[:, :, :-window], (0, 0, window, 0))).float()
    q5 = qf.reshape(B, Hkv, G, T, D)  # a view for the layouts models pass
    c_sum = torch.linalg.vecdot(q5, seen[:, :, None]).reshape(B, H, T) * inv_q
    k_first = k_unit[torch.arange(B, device=device), :, first]  # (B, Hkv, D)
    c_first = torch.matmul(q5, k_first[:, :, None, :, None]).reshape(B, H, T) * inv_q
    pos = torch.arange(T, device=device)
    n_vis = pos + 1 if window is None else (pos + 1).clamp_max(window)  # (T,)
    since_first = pos[None, :] - first[:, None]  # (B, T)
    first_seen = (since_first >= 0) if window is None else (since_first >= 0) & (since_first < window)
    n_other = n_vis[None, :] - first_seen.long()  # (B, T)
    c_other = (c_sum - c_first * first_seen[:, None, :]) / n_other.clamp_min(1)[:, None, :]
    w = ((n_other > 0) & (since_first != 0) & query_valid).float()[:, None, :]  # (B, 1, T)
    cos_first = (c_first * w).sum(-1).to(f64)
    cos_other = (c_other * w).sum(-1).to(f64)
    n_cos = w[:, 0].sum(-1).to(f64)

    output = out.transpose(1, 2).to(query.dtype).contiguous() if compute_output else None  # (B, T, H, D)
    stats = LayerAttentionStats(colsum, count, qv.sum(-1), sink_mass, cos_first, cos_other, n_cos, out_norm,
                                value.float().norm(dim=-1), first, method="fused")
    return output, stats


def _chunked(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    scaling: float,
    mask: Tensor | None,
    query_valid: Tensor | None,
    key_valid: Tensor | None,
    softcap: float | None,
    sink_logits: Tensor | None,
    sliding_window: int | None,
    compute_output: bool,
    chunk_bytes: int,
) -> tuple[Tensor | None, LayerAttentionStats]:
    """The chunked method (the reference): exact softmax attention in query chunks of ``chunk_bytes`` scores."""
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
                                value_norm, first, method="chunked")
    return output, stats
