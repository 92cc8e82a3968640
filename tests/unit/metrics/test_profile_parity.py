"""Every streamed profile number equals the one computed from eager ``output_attentions`` (all architectures)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkscope.capture import attention_probs_eager, forward_hooks, observe_attention
from sinkscope.inputs import TokenBatch
from sinkscope.metrics.attention_stats import attention_with_stats
from sinkscope.models.adapters import get_adapter
from sinkscope.profile import profile_sinks

TOL = 1e-5


def _batch() -> TokenBatch:
    g = torch.Generator().manual_seed(1)
    return TokenBatch([torch.randint(3, 99, (n,), generator=g).tolist() for n in (13, 9, 11)], "ids")


def _eager_alpha(model, seq: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(La, H, T) alpha and (La, H) mean missing row mass, from the quadratic eager reference."""
    att = attention_probs_eager(model, torch.tensor([seq]))
    A = torch.stack(att)[:, 0].double()  # (La, H, T, T)
    # queries that can see key k: all later ones, or only those whose sliding window holds k
    seeing = (A > 0).sum(2).double()
    alpha = A.sum(2) / seeing
    missing = (1 - A.sum(-1)).mean(-1)
    return alpha.numpy(), missing.numpy()


def test_alpha_and_learned_sink_match_eager(tiny) -> None:
    arch, model = tiny
    batch = _batch()
    prof = profile_sinks(model, batch, batch_size=3)
    for i, seq in enumerate(batch.sequences):
        ref, missing = _eager_alpha(model, seq)
        got = prof.alpha[i, :, :, : len(seq)]
        assert np.abs(got - ref).max() < TOL, arch
        assert np.isnan(prof.alpha[i, :, :, len(seq):]).all()
        if prof.sink_mass is not None:
            assert missing.min() > 0.01  # the learned sink really takes attention: rows sum to < 1
            assert np.abs(prof.sink_mass[i] - missing).max() < TOL
        else:
            assert np.abs(missing).max() < 1e-5


def test_alpha_independent_of_chunking_and_batching(tiny) -> None:
    arch, model = tiny
    batch = _batch()
    a = profile_sinks(model, batch, batch_size=3)
    b = profile_sinks(model, batch, batch_size=1, chunk_bytes=1, fused=False)
    assert np.allclose(a.alpha, b.alpha, atol=TOL, equal_nan=True), arch
    assert np.allclose(a.residual_norm, b.residual_norm, rtol=1e-5, equal_nan=True)


class _OutputOnly:
    def __init__(self, model) -> None:
        self.adapter = get_adapter(model)

    def observe(self, module, query, key, value, attention_mask, scaling, **kw):
        out, _ = attention_with_stats(query, key, value, scaling=scaling, mask=attention_mask,
                                      softcap=kw.get("softcap"), sink_logits=kw.get("s_aux"),
                                      sliding_window=kw.get("sliding_window"), chunk_bytes=256)
        return out


@torch.no_grad()
def test_fused_attention_output_equals_model(tiny) -> None:
    arch, model = tiny
    ids = torch.randint(3, 99, (2, 14))
    ref = model(ids).logits
    with observe_attention(model, _OutputOnly(model)):
        got = model(ids).logits
    assert model.config._attn_implementation != "sinkscope"  # restored
    assert torch.allclose(got, ref, atol=TOL), (arch, (got - ref).abs().max())


@torch.no_grad()
def test_residual_and_value_norms_match_reference(tiny) -> None:
    arch, model = tiny
    adapter = get_adapter(model)
    seq = _batch().sequences[0]
    prof = profile_sinks(model, TokenBatch([seq], "ids"))
    ids = torch.tensor([seq])
    values: dict[int, torch.Tensor] = {}

    def keep(l):
        def fn(out):
            if "qkv" in adapter.projection_modules(l):
                values[l] = adapter.split_qkv(out)[2]
            else:
                values[l] = out.view(1, len(seq), adapter.n_kv_heads, adapter.d_head)
        return fn

    hooks = []
    for l in adapter.attention_layers:
        mods = adapter.projection_modules(l)
        hooks.append((mods.get("qkv", mods.get("v")), keep(l), False))
    with forward_hooks(hooks):
        out = model(ids, output_hidden_states=True)
    for j, l in enumerate(adapter.attention_layers):
        ref = values[l][0].norm(dim=-1).T.numpy()  # (Hkv, T)
        assert np.allclose(prof.value_norm[0, j], ref, rtol=1e-5, atol=1e-6), arch
    for l in range(adapter.n_layers - 1):  # the last hidden state has the final norm applied
        ref = out.hidden_states[l + 1][0].norm(dim=-1).numpy()
        assert np.allclose(prof.residual_norm[0, l], ref, rtol=1e-5), arch


@torch.no_grad()
def test_query_key_cosine_matches_manual() -> None:
    from sinkscope.models.random_hf import tiny_model

    model = tiny_model("llama")
    seq = list(range(5, 17))
    prof = profile_sinks(model, TokenBatch([seq], "ids"))
    captured = {}

    class Keep:
        def observe(self, module, q, k, v, mask, scaling, **kw):
            captured[module.layer_idx] = (q, k.repeat_interleave(q.shape[1] // k.shape[1], dim=1))
            return None

    with observe_attention(model, Keep()):
        model(torch.tensor([seq]))
    for l, (q, k) in captured.items():
        qn, kn = torch.nn.functional.normalize(q[0], dim=-1), torch.nn.functional.normalize(k[0], dim=-1)
        cos = qn @ kn.transpose(-1, -2)  # (H, T, T)
        first = cos[:, 1:, 0].mean(-1)
        other = torch.stack([cos[:, t, 1 : t + 1].mean(-1) for t in range(1, len(seq))], -1).mean(-1)
        assert np.allclose(prof.cos_first[0, l], first.numpy(), atol=1e-5)
        assert np.allclose(prof.cos_other[0, l], other.numpy(), atol=1e-5)


@torch.no_grad()
def test_output_gate_is_reported() -> None:
    from sinkscope.models.random_hf import TINY_ARCHITECTURES, tiny_model

    if "qwen3_next" not in TINY_ARCHITECTURES:
        pytest.skip("this transformers has no gated-attention architecture")
    model = tiny_model("qwen3_next")
    adapter = get_adapter(model)
    seq = list(range(5, 17))
    prof = profile_sinks(model, TokenBatch([seq], "ids"))
    assert prof.gate_mean is not None and prof.gate_closed is not None
    q_out = {}
    l = adapter.attention_layers[0]
    with forward_hooks([(adapter.projection_modules(l)["q"], lambda x: q_out.setdefault("x", x), False)]):
        model(torch.tensor([seq]))
    g = torch.sigmoid(adapter.split_gate(q_out["x"]))[0]  # (T, H, D)
    assert np.allclose(prof.gate_mean[0, 0], g.mean(-1).mean(0).numpy(), atol=1e-6)
    assert np.allclose(prof.gate_closed[0, 0], (g < 0.05).float().mean(-1).mean(0).numpy(), atol=1e-6)
    assert prof.gate_closed.max() > 0.05  # the tiny model's gates were made to close
