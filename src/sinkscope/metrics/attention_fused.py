"""Fused attention for the profiler: the output with each query's log-sum-exp, then the softmax's column sums.

Two passes per layer, neither holding a (T, T) matrix:

1. ``attention_lse``: output ``o`` and ``lse_q = log sum_k exp(s_qk)`` (``s_qk = scaling * q.k`` over the keys
   query q sees) from the backend's fused kernel, the one SDPA itself runs. CPU:
   ``aten._scaled_dot_product_flash_attention_for_cpu``; CUDA: the memory-efficient kernel with
   ``compute_log_sumexp=True`` (it takes fp32, unlike flash).
2. ``softmax_column_sums``: ``colsum_k = sum_q w_q exp(s_qk - lse_q)`` over the counted queries (``w_q`` in {0, 1})
   that see key k. Both ways append one dimension that holds ``-lse_q`` on the query side and 1 on the key side
   (``-1e30`` for a query with ``w_q = 0``, so it adds exactly 0), queries pre-scaled, so one matrix product
   gives ``s_qk - lse_q`` directly:
   - ``"blocked"`` (default): per block of 64 queries and one kv head, that product, ``exp`` in place and the
     weighted sum over the block's queries (a matrix-vector product), accumulated in fp64 across blocks;
   - ``"swapped"``: one fused-kernel call with the roles swapped (keys as queries, queries as keys, scale 1,
     head dim padded to a multiple of 8), whose log-sum-exp is ``log colsum_k``; plain causal attention reverses
     the sequence so that "query q >= key k" becomes the kernel's causal mask. It pays the kernel's value product
     for nothing: on CPU it costs about as much as the first pass, the blocked way about 0.65x.
   A sliding window runs in blocks of rows against the band of columns they can see, with one additive band
   mask shared by all blocks.

Both ways agree with an fp64 reference to a relative ~5e-7 at 8k tokens (SmolLM2-sized heads).

Shapes: B batch, H query heads, Hkv key/value heads (GQA, H = G * Hkv, query head h uses kv head h // G),
T positions (queries and keys are the same T positions), D head dim. Inputs must already be fp32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

#: Log-weight that removes a query from the column sums without a mask (exp(-1e30 + anything finite) == 0).
EXCLUDED = -1e30


class FusedUnavailable(Exception):
    """The backend has no suitable fused kernel, or it refused the input: use the chunked path."""


Kernel = Callable[[Tensor, Tensor, Tensor, bool, "Tensor | None", float], tuple[Tensor, Tensor]]


def _cpu_kernel(q: Tensor, k: Tensor, v: Tensor, causal: bool, bias: Tensor | None, scale: float
                ) -> tuple[Tensor, Tensor]:
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        raise FusedUnavailable("this torch has no _scaled_dot_product_flash_attention_for_cpu")
    try:
        return op(q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
    except RuntimeError as e:  # e.g. an older kernel without native GQA, or an unsupported head dim
        if k.shape[1] != q.shape[1]:
            g = q.shape[1] // k.shape[1]
            try:
                return op(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), 0.0, causal, attn_mask=bias,
                          scale=scale)
            except RuntimeError:
                pass
        raise FusedUnavailable(f"the CPU flash kernel refused the input: {e}") from e


def _cuda_kernel(q: Tensor, k: Tensor, v: Tensor, causal: bool, bias: Tensor | None, scale: float
                 ) -> tuple[Tensor, Tensor]:
    op = getattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", None)
    if op is None:
        raise FusedUnavailable("this torch has no _scaled_dot_product_efficient_attention")
    if k.shape[1] != q.shape[1]:  # no native GQA in this kernel
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    if bias is not None:  # the kernel wants the bias's rows 16-element aligned
        n, m = bias.shape[-2:]
        padded = bias.new_empty(*bias.shape[:-1], -(-m // 16) * 16)
        padded[..., :m] = bias
        bias = padded[..., :m].expand(q.shape[0], q.shape[1], n, m)
    try:
        out, lse = op(q, k, v, bias, True, 0.0, causal, scale=scale)[:2]
    except RuntimeError as e:
        raise FusedUnavailable(f"the CUDA memory-efficient kernel refused the input: {e}") from e
    return out, lse[..., : q.shape[2]]  # lse comes padded to a multiple of 32 rows


#: device type -> fused kernel ``(q, k, v, causal, additive bias or None, scale) -> (output, lse)``.
KERNELS: dict[str, Kernel] = {"cpu": _cpu_kernel, "cuda": _cuda_kernel}


def kernel_for(device: torch.device) -> Kernel:
    """The fused kernel of ``device``'s backend, or raise `FusedUnavailable`."""
    try:
        return KERNELS[device.type]
    except KeyError:
        raise FusedUnavailable(f"no fused attention kernel for device type {device.type!r}") from None


def band_block(window: int, T: int) -> int:
    """Rows per block of a sliding-window pass: each block costs rows x (rows + window - 1) scores."""
    return max(1, min(T, max(128, min(window, 1024))))


def _band_bias(rows: int, window: int, like: Tensor) -> Tensor:
    """(1, 1, rows, rows + window - 1) additive mask: 0 where ``0 <= column - row < window``, else -inf.

    Row i of a block of rows starting at r0 against columns starting at r0 - window + 1 (queries over keys) or at
    r0 (keys over queries, the swapped call) sees exactly its band: the pattern is the same for every block.
    """
    i = torch.arange(rows, device=like.device)[:, None]
    j = torch.arange(rows + window - 1, device=like.device)[None, :]
    ok = (j >= i) & (j - i < window)
    return torch.zeros(1, 1, rows, rows + window - 1, dtype=like.dtype, device=like.device).masked_fill_(
        ~ok, float("-inf"))


def attention_lse(query: Tensor, key: Tensor, value: Tensor, scaling: float, window: int | None = None
                  ) -> tuple[Tensor, Tensor]:
    """Causal (optionally sliding-window) softmax attention and each query's log-sum-exp, fused.

    Args:
        query: (B, H, T, D) fp32.
        key, value: (B, Hkv, T, D) fp32.
        scaling: multiplier of q.k.
        window: query q sees keys k with ``0 <= q - k < window``; None for plain causal attention.

    Returns:
        ``(output (B, H, T, D) fp32, lse (B, H, T) fp32)``, natural log.

    Raises:
        FusedUnavailable: no fused kernel on this device, or it refused the input.
    """
    kernel = kernel_for(query.device)
    T = query.shape[2]
    if window is None or window >= T:
        return kernel(query, key, value, True, None, scaling)
    C = band_block(window, T)
    bias = _band_bias(C, window, query)
    out = query.new_empty(query.shape)
    lse = query.new_empty(query.shape[:3])
    for q0 in range(0, T, C):
        q1 = min(T, q0 + C)
        lo = max(0, q0 - window + 1)
        c0 = lo - (q0 - window + 1)  # the bias's column of key lo
        o, l = kernel(query[:, :, q0:q1], key[:, :, lo:q1], value[:, :, lo:q1], False,
                      bias[:, :, : q1 - q0, c0 : c0 + q1 - lo], scaling)
        out[:, :, q0:q1], lse[:, :, q0:q1] = o, l
    return out, lse


def softmax_column_sums(query: Tensor, key: Tensor, lse: Tensor, scaling: float, *, query_weight: Tensor,
                        window: int | None = None, how: str = "blocked", head_bytes: int = 16 * 2**20) -> Tensor:
    """``colsum[b, h, k] = sum_q w[b, q] exp(scaling * q.k - lse[b, h, q])`` over the queries that see key k.

    Args:
        query: (B, H, T, D) fp32.
        key: (B, Hkv, T, D) fp32.
        lse: (B, H, T) fp32, each query's log-sum-exp (of everything its softmax normalises over, learned sinks
            included).
        scaling: multiplier of q.k.
        query_weight: (B, T) bool, the queries that count (real ones).
        window: as in `attention_lse`.
        how: ``"blocked"`` (default): per block of queries, one matrix product gives ``s_qk - lse_q`` (the extra
            dimension), ``exp`` in place, and a weighted sum over the block's queries, accumulated in fp64; no
            value product, so it costs about 0.65x the first call on CPU (1 thread, SmolLM2 heads, 2k-8k tokens).
            ``"swapped"``: one call of the fused kernel with queries and keys swapped (see the module docstring),
            about 1.0-1.3x the first call (its value product is wasted).
        head_bytes: memory budget of the swapped call's inputs and output; heads are processed in groups within it.

    Returns:
        (B, H, T) float64 column sums (0 for a key no counted query sees).

    Raises:
        FusedUnavailable: the swapped call found no fused kernel on this device, or it refused the input.
    """
    neg_lse = (-lse).masked_fill(~query_weight[:, None, :], EXCLUDED)  # (B, H, T)
    if how == "blocked":
        return _column_sums_blocked(query, key, neg_lse, scaling, query_weight, window)
    if how == "swapped":
        return _column_sums_swapped(query, key, neg_lse, scaling, window, head_bytes)
    raise ValueError(f"unknown column-sum method {how!r}")


def _blocks(device: torch.device, B: int, Hkv: int, G: int, T: int) -> tuple[int, int]:
    """(kv heads, query rows) per block of the blocked column sums. CPU: 64 rows, and as many kv heads as keep a
    block's scores within 2.5 MiB (cache), at least one: measured best among 32-256 rows x 1 or 3 kv heads on
    SmolLM2's heads at 512-4k tokens (1 thread). Elsewhere every head and up to 256 MiB of scores, to launch few
    kernels."""
    if device.type == "cpu":
        return max(1, min(Hkv, (5 * 2**19) // max(1, B * G * 64 * T * 4))), 64
    return Hkv, max(64, min(T, 2**26 // max(1, B * Hkv * G * T)))


def _column_sums_blocked(query: Tensor, key: Tensor, neg_lse: Tensor, scaling: float, query_weight: Tensor,
                         window: int | None) -> Tensor:
    B, H, T, D = query.shape
    Hkv = key.shape[1]
    G = H // Hkv
    # queries [scaling * q, -lse_q] laid out (B, Hkv, T, G, D + 1): a block of rows of one kv head's G query
    # heads is one contiguous (rows * G, D + 1) matrix, so each block is a single matrix product
    qx = query.new_empty(B, Hkv, T, G, D + 1)
    torch.mul(query.reshape(B, Hkv, G, T, D).transpose(2, 3), scaling, out=qx[..., :D])
    qx[..., D] = neg_lse.view(B, Hkv, G, T).transpose(2, 3)
    kxt = query.new_empty(B, Hkv, D + 1, T)  # keys, transposed: [k, 1]
    kxt[:, :, :D] = key.transpose(-1, -2)
    kxt[:, :, D] = 1.0
    w = query_weight.to(query.dtype)[:, None, None, :]  # (B, 1, 1, T)
    colsum = torch.zeros(B, Hkv, G, T, dtype=torch.float64, device=query.device)
    hk, C = _blocks(query.device, B, Hkv, G, T)
    banded = window is not None and window < T
    width = C + window - 1 if banded else C  # type: ignore[operator]
    bias = _band_bias(C, window, query)[0, 0] if banded else query.new_full((C, C), float("-inf")).triu_(1)
    buf = query.new_empty(B * hk * C * G * (min(T, width) if banded else T))
    for g0 in range(0, Hkv, hk):
        g1 = min(Hkv, g0 + hk)
        for q0 in range(0, T, C):
            q1 = min(T, q0 + C)
            lo = max(0, q0 - window + 1) if banded else 0  # type: ignore[operator]  # first key the block sees
            n, m = q1 - q0, q1 - lo
            s = buf[: B * (g1 - g0) * n * G * m].view(B, g1 - g0, n * G, m)
            torch.matmul(qx[:, g0:g1, q0:q1].reshape(B, g1 - g0, n * G, D + 1), kxt[:, g0:g1, :, lo:q1],
                         out=s)  # rows (query, head): s_qk - lse_q
            rows = s.view(B, g1 - g0, n, G, m)
            if banded:
                c0 = lo - (q0 - window + 1)  # type: ignore[operator]
                rows += bias[:n, None, c0 : c0 + m]
            else:
                rows[..., q0:] += bias[:n, None, :n]  # the block's own diagonal: keys after the query
            s.exp_()
            part = torch.matmul(w[..., q0:q1], s.view(B, g1 - g0, n, G * m))  # (B, hk, 1, G * m)
            colsum[:, g0:g1, :, lo:q1] += part.view(B, g1 - g0, G, m)
    return colsum.view(B, H, T)


def _column_sums_swapped(query: Tensor, key: Tensor, neg_lse: Tensor, scaling: float, window: int | None,
                         head_bytes: int) -> Tensor:
    kernel = kernel_for(query.device)
    B, H, T, D = query.shape
    G = H // key.shape[1]
    Dp = -(-(D + 1) // 8) * 8  # the extra dimension, padded to a multiple of 8
    reverse = window is None or window >= T
    colsum = torch.empty(B, H, T, dtype=torch.float64, device=query.device)
    per_head = 4 * B * T * Dp * query.element_size()  # kx, qx, a reversed copy, the kernel's output
    step = max(1, min(H, head_bytes // max(1, per_head)))
    for h0 in range(0, H, step):
        h1 = min(H, h0 + step)
        heads = torch.arange(h0, h1, device=query.device)
        kx = query.new_zeros(B, h1 - h0, T, Dp)  # keys acting as queries: [k, 1, 0...]
        kx[..., :D] = key[:, heads // G]
        kx[..., D] = 1.0
        qx = query.new_zeros(B, h1 - h0, T, Dp)  # queries acting as keys: [scaling * q, -lse_q, 0...]
        torch.mul(query[:, h0:h1], scaling, out=qx[..., :D])
        qx[..., D] = neg_lse[:, h0:h1]
        if reverse:  # "q >= k" is the ordinary causal mask of the reversed sequence
            kx, qx = kx.flip(2), qx.flip(2)
            _, l2 = kernel(kx, qx, qx, True, None, 1.0)
            colsum[:, h0:h1] = l2.flip(-1).double().exp()
            continue
        assert window is not None
        C = band_block(window, T)
        bias = _band_bias(C, window, query)
        for k0 in range(0, T, C):  # keys k0..k1 see the queries k0 .. k1 + window - 2
            k1, hi = min(T, k0 + C), min(T, k0 + C + window - 1)
            _, l2 = kernel(kx[:, :, k0:k1], qx[:, :, k0:hi], qx[:, :, k0:hi], False,
                           bias[:, :, : k1 - k0, : hi - k0], 1.0)
            colsum[:, h0:h1, k0:k1] = l2.double().exp()
    return colsum
