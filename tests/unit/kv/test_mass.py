"""Head masses (sinks / window / distant per kv head) against eager `output_attentions` on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkscope.capture import attention_probs_eager
from sinkscope.kv.mass import first_counted_query, head_masses
from sinkscope.models.adapters import get_adapter
from sinkscope.models.random_hf import tiny_model

ARCHS = ["llama", "qwen3", "gpt_neox"]


def _reference(probs: list[torch.Tensor], n_kv: int, n_sink: int, window: int) -> np.ndarray:
    """(L, Hkv, 3) distant/sink/window from the full (B, H, T, T) attention matrices, by explicit key masks."""
    out = []
    for p in probs:
        p = p[0].double()  # (H, T, T)
        H, T, _ = p.shape
        t = torch.arange(T)[:, None]
        k = torch.arange(T)[None, :]
        sink = (k < n_sink) & (k <= t)
        win = (k >= t - window) & (k <= t)
        dist = (k <= t) & ~sink & ~win
        rows = slice(first_counted_query(n_sink, window), T)
        per_head = torch.stack([(p * m).sum(-1)[:, rows].mean(-1) for m in (dist, sink, win)], -1)  # (H, 3)
        out.append(per_head.view(n_kv, H // n_kv, 3).sum(1))
    return torch.stack(out).numpy()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n_sink,window", [(2, 5), (0, 7), (4, 1)])
def test_masses_equal_eager_output_attentions(arch: str, n_sink: int, window: int) -> None:
    model = tiny_model(arch)
    ids = torch.randint(3, 99, (1, 40))
    got = head_masses(model, [ids[0]], n_sink=n_sink, window=window, block=7)
    a = get_adapter(model)
    ref = _reference(attention_probs_eager(model, ids), a.n_kv_heads, n_sink, window)
    np.testing.assert_allclose(got[..., :3], ref, atol=1e-5, rtol=0)
    G = a.kv_groups
    np.testing.assert_allclose(got[..., :3].sum(-1), G, atol=1e-5)  # the three regions partition each query's mass


def test_masses_average_over_texts_by_query_count() -> None:
    model = tiny_model("llama")
    a, b = torch.randint(3, 99, (30,)), torch.randint(3, 99, (50,))
    both = head_masses(model, [a, b], n_sink=2, window=4)
    ma = head_masses(model, [a], n_sink=2, window=4)
    mb = head_masses(model, [b], n_sink=2, window=4)
    na, nb = 30 - 7, 50 - 7
    np.testing.assert_allclose(both, (ma * na + mb * nb) / (na + nb), atol=1e-9)


def test_too_short_text_is_refused() -> None:
    from sinkscope.errors import InputError

    with pytest.raises(InputError, match="longer than"):
        head_masses(tiny_model("llama"), [torch.randint(3, 99, (6,))], n_sink=2, window=4)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_drop_error_is_the_attention_output_change_when_one_head_streams(arch: str) -> None:
    """Reference: the o_proj output of layer l under the dense model and under a policy where only kv head j of
    layer l streams (earlier layers are untouched, so the difference is that head's effect alone)."""
    from sinkscope.kv.attention import policy_masked
    from sinkscope.kv.policy import KVPolicy

    model = tiny_model(arch)
    a = get_adapter(model)
    n_sink, window, T = 2, 5, 30
    ids = torch.randint(3, 99, (1, T))
    got = head_masses(model, [ids[0]], n_sink=n_sink, window=window, block=4)
    t0 = first_counted_query(n_sink, window)
    for layer, head in [(0, 0), (1, a.n_kv_heads - 1)]:
        outs = []

        def grab(_m, _i, o):
            outs.append(o.detach())

        h = a.output_projection(layer).register_forward_hook(grab)
        full = tuple(tuple(range(a.n_kv_heads)) if l != layer else
                     tuple(x for x in range(a.n_kv_heads) if x != head) for l in range(a.n_layers))
        policy = KVPolicy(full, a.n_layers, a.n_kv_heads, n_sink, window, T)
        with torch.no_grad():
            model(ids)
            with policy_masked(model, policy):
                model(ids, use_cache=False)
        h.remove()
        ref = (outs[1] - outs[0])[0, t0:].norm(dim=-1).mean().item()
        assert got[layer, head, 3] == pytest.approx(ref, rel=1e-4, abs=1e-6)
