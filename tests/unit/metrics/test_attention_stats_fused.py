"""The fused attention statistics equal the chunked reference and a dense fp64 computation (every architecture)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkscope.capture import attention_probs_eager, observe_attention
from sinkscope.errors import InputError
from sinkscope.inputs import TokenBatch
from sinkscope.metrics import attention_fused
from sinkscope.metrics.attention_stats import LayerAttentionStats, attention_with_stats
from sinkscope.models.adapters import get_adapter
from sinkscope.models.random_hf import TINY_ARCHITECTURES, tiny_model
from sinkscope.profile import profile_sinks

#: fp32 inputs: every per-query mean within this of the reference (the parity tolerance of the profiler).
TOL = 1e-5
#: bf16 inputs: the statistics are computed in fp32 from the bf16 values, so they stay within TOL of the fp64
#: reference on the same values; only the returned output is rounded to bf16 (8 mantissa bits).
BF16_OUT_RTOL = 2**-7


def _means(stats: LayerAttentionStats) -> dict[str, torch.Tensor]:
    """The per-query means the profile reports, from the sums."""
    n_q = stats.n_queries.clamp_min(1)[:, None]
    n_cos = stats.n_cos.clamp_min(1)[:, None]
    out = {"alpha": stats.alpha, "cos_first": stats.cos_first / n_cos, "cos_other": stats.cos_other / n_cos,
           "out_norm": stats.out_norm / n_q, "value_norm": stats.value_norm.double(), "count": stats.count,
           "n_queries": stats.n_queries, "n_cos": stats.n_cos}
    if stats.sink_mass is not None:
        out["sink_mass"] = stats.sink_mass / n_q
    return out


def _assert_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tol: float = TOL, what: str = "") -> None:
    assert got.keys() == ref.keys(), what
    for name in ref:
        a, b = got[name].double().cpu(), ref[name].double().cpu()
        assert torch.equal(torch.isnan(a), torch.isnan(b)), (what, name)
        err = (a - b).nan_to_num().abs().max().item() if a.numel() else 0.0
        assert err < tol, (what, name, err)


def _dense_reference(q, k, v, scaling, query_valid, window=None, sink=None):
    """Every statistic from the full (B, H, T, T) attention in fp64 (first real key at position 0)."""
    B, H, T, D = q.shape
    G = H // k.shape[1]
    qd, kd, vd = q.double(), k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    pos = torch.arange(T)
    d = pos[:, None] - pos[None, :]
    vis = (d >= 0) if window is None else (d >= 0) & (d < window)  # (T, T)
    s = (qd @ kd.transpose(-1, -2) * scaling).masked_fill(~vis, float("-inf"))
    qv = query_valid.double()  # (B, T)
    out = {}
    if sink is not None:
        full = torch.cat([s, sink.double().view(1, H, 1, 1).expand(B, H, T, 1)], -1).softmax(-1)
        p = full[..., :-1]
        out["sink_mass"] = (full[..., -1] * qv[:, None]).sum(-1) / qv.sum(-1)[:, None]
    else:
        p = s.softmax(-1)
    count = (vis[None].double() * qv[:, :, None]).sum(1)  # (B, T)
    out["alpha"] = (p * qv[:, None, :, None]).sum(2) / count[:, None]
    cos = torch.nn.functional.normalize(qd, dim=-1) @ torch.nn.functional.normalize(kd, dim=-1).transpose(-1, -2)
    other = vis.clone()
    other[:, 0] = False
    n_other = other.sum(-1)  # (T,)
    w = ((pos > 0) & (n_other > 0))[None] & query_valid  # (B, T)
    c_first = cos[..., 0]  # (B, H, T)
    c_other = (cos * other).sum(-1) / n_other.clamp_min(1)
    n_cos = w.sum(-1).double()
    out["cos_first"] = (c_first * w[:, None]).sum(-1) / n_cos.clamp_min(1)[:, None]
    out["cos_other"] = (c_other * w[:, None]).sum(-1) / n_cos.clamp_min(1)[:, None]
    o = p @ vd  # (B, H, T, D)
    out["out_norm"] = (o.norm(dim=-1) * qv[:, None]).sum(-1) / qv.sum(-1)[:, None]
    out["value_norm"] = v.double().norm(dim=-1)
    out["count"] = count
    out["n_queries"] = qv.sum(-1)
    out["n_cos"] = n_cos
    return out, o.transpose(1, 2)


def _inputs(B, H, Hkv, T, D, padded, window, dtype=torch.float32):
    g = torch.Generator().manual_seed(T * 7 + H + Hkv)
    q = torch.randn(B, H, T, D, generator=g) * 2
    k = torch.randn(B, Hkv, T, D, generator=g) * 2
    k[:, :, 0] *= 3  # a key that draws attention, like a sink
    v = torch.randn(B, Hkv, T, D, generator=g)
    valid = torch.ones(B, T, dtype=torch.bool)
    mask = None
    if padded:  # right padding, with the mask transformers builds (causal, window, padded keys hidden)
        for b in range(1, B):
            valid[b, T - (T // 3) * b:] = False
        pos = torch.arange(T)
        d = pos[:, None] - pos[None, :]
        vis = (d >= 0) if window is None else (d >= 0) & (d < window)
        mask = (vis[None] & valid[:, None, :])[:, None]
    return q.to(dtype), k.to(dtype), v.to(dtype), valid, mask


CASES = [  # (B, H, Hkv, T, D, padded, window, sinks)
    (1, 4, 4, 300, 16, False, None, False),
    (3, 4, 2, 257, 8, True, None, False),  # GQA, padding, a head dim not a multiple of 8
    (2, 6, 2, 200, 12, True, 37, False),  # sliding window
    (2, 4, 1, 180, 16, True, 64, True),  # learned sinks, window, multi-query
    (1, 4, 2, 200, 16, False, None, True),
    (2, 4, 2, 50, 8, False, 500, False),  # a window longer than the sequence is plain causal
    (1, 2, 1, 1, 8, False, None, False),  # one token
]


@pytest.mark.parametrize("case", CASES, ids=[f"B{c[0]}H{c[1]}kv{c[2]}T{c[3]}D{c[4]}p{c[5]:d}w{c[6]}s{c[7]:d}"
                                             for c in CASES])
def test_fused_equals_chunked_and_dense(case) -> None:
    B, H, Hkv, T, D, padded, window, sinks = case
    q, k, v, valid, mask = _inputs(B, H, Hkv, T, D, padded, window)
    sink = torch.linspace(-1.0, 3.0, H) if sinks else None
    scaling = D**-0.5
    kw = dict(scaling=scaling, mask=mask, query_valid=valid, key_valid=valid, sink_logits=sink,
              sliding_window=window)
    out_f, fused = attention_with_stats(q, k, v, **kw)
    out_c, chunked = attention_with_stats(q, k, v, method="chunked", chunk_bytes=2**18, **kw)  # several chunks
    assert fused.method == "fused" and chunked.method == "chunked"
    ref, out_ref = _dense_reference(q, k, v, scaling, valid, window, sink)
    _assert_close(_means(fused), ref, what="fused")
    _assert_close(_means(chunked), ref, what="chunked")
    assert out_f is not None and out_c is not None and out_f.shape == (B, T, H, D)
    rows = valid[:, :, None, None]  # a padding query's output is not defined the same way by both methods
    assert ((out_f - out_ref).abs() * rows).max() < TOL
    assert ((out_f - out_c).abs() * rows).max() < TOL
    for f in ("colsum", "count", "n_queries", "cos_first", "cos_other", "n_cos", "out_norm"):
        assert getattr(fused, f).dtype == torch.float64, f


def test_bf16_inputs_give_fp32_statistics() -> None:
    q, k, v, valid, mask = _inputs(2, 4, 2, 160, 16, True, None, dtype=torch.bfloat16)
    kw = dict(scaling=0.25, mask=mask, query_valid=valid, key_valid=valid)
    out, fused = attention_with_stats(q, k, v, **kw)
    _, chunked = attention_with_stats(q, k, v, method="chunked", **kw)
    assert fused.method == "fused" and out is not None and out.dtype == torch.bfloat16
    ref, out_ref = _dense_reference(q, k, v, 0.25, valid)  # fp64 from the same bf16 values
    _assert_close(_means(fused), ref, what="fused bf16")
    _assert_close(_means(chunked), ref, what="chunked bf16")
    rows = valid[:, :, None, None]
    assert (((out.double() - out_ref).abs() - BF16_OUT_RTOL * out_ref.abs()) * rows).max() < TOL


def test_soft_capping_left_padding_and_biases_fall_back_to_chunked() -> None:
    q, k, v, valid, mask = _inputs(2, 4, 2, 40, 8, True, None)
    base = dict(scaling=0.3, query_valid=valid, key_valid=valid)
    assert attention_with_stats(q, k, v, mask=mask, **base)[1].method == "fused"
    assert attention_with_stats(q, k, v, mask=mask, softcap=2.0, **base)[1].method == "chunked"
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert attention_with_stats(q, k, v, mask=additive, **base)[1].method == "fused"  # a float mask is a mask
    biased = additive + 0.5 * mask  # an additive bias (ALiBi-like) is not a mask: chunked adds it
    out_b, st_b = attention_with_stats(q, k, v, mask=biased, **base)
    assert st_b.method == "chunked"
    left = mask.clone()
    left[1, 0, :, :3] = False  # the second row's first three keys are padding on the left
    assert attention_with_stats(q, k, v, mask=left, **base)[1].method == "chunked"
    # fewer queries than keys (a continuation): chunked
    _, st = attention_with_stats(q[:, :, -5:], k, v, scaling=0.3)
    assert st.method == "chunked"


def test_a_mask_changed_in_place_is_checked_again() -> None:
    q, k, v, valid, mask = _inputs(2, 4, 2, 30, 8, True, None)
    base = dict(scaling=0.3, query_valid=valid, key_valid=valid)
    assert attention_with_stats(q, k, v, mask=mask, **base)[1].method == "fused"
    mask[0, 0, 10, 2] = False  # no longer causal on a real row
    assert attention_with_stats(q, k, v, mask=mask, **base)[1].method == "chunked"


def test_a_refusing_kernel_falls_back_cleanly(monkeypatch) -> None:
    q, k, v, valid, _ = _inputs(2, 4, 2, 30, 8, False, None)
    ref = attention_with_stats(q, k, v, scaling=0.3, method="chunked")

    def refuse(*args, **kwargs):
        raise attention_fused.FusedUnavailable("refused")

    monkeypatch.setitem(attention_fused.KERNELS, "cpu", refuse)
    out, st = attention_with_stats(q, k, v, scaling=0.3)
    assert st.method == "chunked"
    assert torch.equal(out, ref[0]) and torch.equal(st.colsum, ref[1].colsum)
    monkeypatch.delitem(attention_fused.KERNELS, "cpu")  # a device type without a fused kernel
    assert attention_with_stats(q, k, v, scaling=0.3)[1].method == "chunked"


def test_unknown_method_is_refused() -> None:
    q, k, v, _, _ = _inputs(1, 2, 1, 4, 8, False, None)
    with pytest.raises(InputError, match="unknown attention statistics method 'flash'"):
        attention_with_stats(q, k, v, scaling=0.3, method="flash")


def _long_model(arch: str, **extra):
    """A tiny model with room for a few hundred positions."""
    return tiny_model(arch, max_position_embeddings=512, **extra)


class _BothMethods:
    """Observer that runs both methods on every call the model makes and keeps their statistics."""

    def __init__(self, model, valid: torch.Tensor) -> None:
        self.layer_of = {id(get_adapter(model).attention_module(l)): l for l in get_adapter(model).attention_layers}
        self.valid = valid
        self.calls: list[tuple[LayerAttentionStats, LayerAttentionStats, torch.Tensor, torch.Tensor]] = []

    def observe(self, module, query, key, value, attention_mask, scaling, **kw):
        if id(module) not in self.layer_of:
            return None
        args = dict(scaling=scaling, mask=attention_mask, query_valid=self.valid, key_valid=self.valid,
                    softcap=kw.get("softcap"), sink_logits=kw.get("s_aux"), sliding_window=kw.get("sliding_window"))
        out_f, fused = attention_with_stats(query, key, value, **args)
        out_c, chunked = attention_with_stats(query, key, value, method="chunked", **args)
        self.calls.append((fused, chunked, out_f, out_c))
        return out_c


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
@torch.no_grad()
def test_fused_equals_chunked_on_every_architecture(arch) -> None:
    """The calls each model really makes (its masks, windows, sinks, soft-capping), right-padded, T up to 300."""
    model = _long_model(arch)
    lengths = [300, 211, 97]
    ids = torch.randint(3, 99, (3, 300), generator=torch.Generator().manual_seed(3))
    valid = torch.arange(300)[None, :] < torch.tensor(lengths)[:, None]
    spy = _BothMethods(model, valid)
    with observe_attention(model, spy):
        model(input_ids=ids, attention_mask=valid.long(), use_cache=False)
    assert len(spy.calls) == len(get_adapter(model).attention_layers)
    softcap = getattr(model.config, "attn_logit_softcapping", None)
    for fused, chunked, out_f, out_c in spy.calls:
        assert fused.method == ("chunked" if softcap else "fused"), arch
        _assert_close(_means(fused), _means(chunked), what=arch)
        assert ((out_f - out_c).abs() * valid[:, :, None, None]).max() < TOL, arch


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
@torch.no_grad()
def test_profile_equals_eager_at_a_few_hundred_tokens(arch) -> None:
    """profile_sinks (fused by default) against eager output_attentions on a padded batch of long rows."""
    model = _long_model(arch)
    g = torch.Generator().manual_seed(5)
    batch = TokenBatch([torch.randint(3, 99, (n,), generator=g).tolist() for n in (260, 181)], "ids")
    prof = profile_sinks(model, batch, batch_size=2)
    for i, seq in enumerate(batch.sequences):
        A = torch.stack(attention_probs_eager(model, torch.tensor([seq])))[:, 0].double()  # (La, H, T, T)
        alpha = A.sum(2) / (A > 0).sum(2).double()
        assert np.abs(prof.alpha[i, :, :, : len(seq)] - alpha.numpy()).max() < TOL, arch
        if prof.sink_mass is not None:
            assert np.abs(prof.sink_mass[i] - (1 - A.sum(-1)).mean(-1).numpy()).max() < TOL, arch


@pytest.mark.gpu
@torch.no_grad()
def test_fused_on_cuda_equals_chunked() -> None:
    dev = torch.device("cuda")
    for padded, window, sinks in ((False, None, False), (True, None, True), (True, 40, False)):
        q, k, v, valid, mask = _inputs(2, 4, 2, 300, 64, padded, window)
        sink = torch.linspace(-1.0, 3.0, 4, device=dev) if sinks else None
        kw = dict(scaling=0.125, mask=None if mask is None else mask.to(dev), query_valid=valid.to(dev),
                  key_valid=valid.to(dev), sink_logits=sink, sliding_window=window)
        out_f, fused = attention_with_stats(q.to(dev), k.to(dev), v.to(dev), **kw)
        out_c, chunked = attention_with_stats(q.to(dev), k.to(dev), v.to(dev), method="chunked", **kw)
        assert fused.method == "fused" and fused.colsum.device.type == "cuda"
        _assert_close(_means(fused), _means(chunked), what=f"cuda {padded} {window} {sinks}")
        assert ((out_f - out_c).abs() * valid.to(dev)[:, :, None, None]).max() < TOL


@pytest.mark.parametrize("blocks", [None, (1, 16)], ids=["default-blocks", "one-kv-head-x-16"])
@pytest.mark.parametrize("window", [None, 9, 70])
def test_blocked_and_swapped_column_sums_agree(window, blocks, monkeypatch) -> None:
    """Both ways of summing the columns, against fp64, with padding, GQA and more rows than one block."""
    if blocks is not None:
        monkeypatch.setattr(attention_fused, "_blocks", lambda *args: blocks)
    q, k, v, valid, _ = _inputs(2, 6, 2, 150, 16, True, window)
    _, lse = attention_fused.attention_lse(q, k, v, 0.25, window)
    G = 3
    s = (q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2)) * 0.25 - lse.double()[..., None]
    pos = torch.arange(150)
    d = pos[:, None] - pos[None, :]
    vis = (d >= 0) if window is None else (d >= 0) & (d < window)
    ref = (s.masked_fill(~vis, float("-inf")).exp() * valid[:, None, :, None]).sum(2)  # (B, H, T)
    for how in ("blocked", "swapped"):
        got = attention_fused.softmax_column_sums(q, k, lse, 0.25, query_weight=valid, window=window, how=how,
                                                  head_bytes=150 * 24 * 4 * 4)  # two heads per swapped call
        assert got.dtype == torch.float64
        assert ((got - ref).abs() / ref.clamp_min(1e-3)).max() < 1e-5, how
