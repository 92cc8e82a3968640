"""The head-wise KV cache on the real SmolLM2 (30 layers x 3 kv heads, GQA 9/3): exact against the dense
per-head-masked forward, token by token and in chunks; generate; bytes at the budget; a quick calibration."""

from __future__ import annotations

import pytest
import torch

from sinkscope.compat import cache_kwargs
from sinkscope.kv.attention import policy_masked
from sinkscope.kv.cache import headwise_cache
from sinkscope.kv.policy import KVPolicy

pytestmark = pytest.mark.slow

T, S, W = 160, 4, 28
TEXT = ("The lighthouse on the northern cape was built in 1851, after a winter in which three ships were lost on the "
        "rocks within a single month. The keepers who lived there kept a daily log, and many of those books survive "
        "in the county archive. They describe the weather, the state of the lamp, the ships that passed, and the "
        "small events of a life spent far from any town. In the first years the light burned whale oil, which had "
        "to be carried up the narrow stairs every evening. Later it burned paraffin, and in the last decades before "
        "the station was automated it ran on electricity from a diesel generator that the keepers maintained "
        "themselves. The work was not difficult, but it never stopped. The lens had to be cleaned every morning.")


@pytest.fixture(autouse=True, scope="module")
def _restore_attention(smollm2):
    """The real model is shared by the whole session: give it back with its own attention implementation."""
    yield
    from sinkscope.kv.attention import restore_attention

    restore_attention(smollm2[0])


@pytest.fixture(scope="module")
def setup(smollm2):
    model, tok = smollm2
    ids = torch.tensor(tok(TEXT + " " + TEXT, add_special_tokens=False)["input_ids"][:T])[None]
    assert ids.shape[1] == T
    policy = KVPolicy.random(model, 0.5, S, W, T, seed=0)
    with torch.no_grad(), policy_masked(model, policy):
        ref = model(ids, use_cache=False).logits
    return model, tok, ids, policy, ref


@pytest.mark.parametrize("chunk", [1, 48])
def test_exact_against_the_masked_dense_forward(setup, chunk: int) -> None:
    model, _, ids, policy, ref = setup
    cache = headwise_cache(model, policy)
    with torch.no_grad():
        got = torch.cat([model(ids[:, a:a + chunk], **cache_kwargs(model, cache)).logits
                         for a in range(0, T, chunk)], dim=1)
    torch.testing.assert_close(torch.softmax(got, -1), torch.softmax(ref, -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    frac = cache.stored_bytes() / cache.dense_bytes()
    assert frac == pytest.approx(policy.bytes_fraction(T)) and abs(frac - 0.5) / 0.5 < 0.05
    with torch.no_grad():
        dense = model(ids).logits
    assert (dense - ref).abs().max() > 1e-2  # the policy changes the model: the comparison can fail


def test_generate_equals_the_masked_dense_greedy(setup) -> None:
    model, _, ids, policy, _ = setup
    prompt = ids[:, :120]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                             **cache_kwargs(model, headwise_cache(model, policy)))
        seq = prompt
        for _ in range(8):
            with policy_masked(model, policy):
                nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert out.tolist() == seq.tolist()


def test_calibrated_kl_is_what_the_cache_does(smollm2) -> None:
    """A small calibration on the user's text: the policy's measured held-out KL equals the KL of the head-wise
    cache fed token by token, and the bytes land on the budget."""
    from sinkscope.kv.calibrate import calibrate
    from sinkscope.kv.calibration_data import calibration_sets

    model, tok = smollm2
    text = " ".join([TEXT] * 4)
    length = 128
    res = calibrate(model, tok, texts=[text], target_length=length, n_sink=S, window=W, budget=0.5)
    p = res.policy
    assert abs(p.budget - 0.5) / 0.5 < 0.05 and p.measured_kl > 0
    held = calibration_sets(tok, length, texts=[text]).held_out
    total, n = 0.0, 0
    with torch.no_grad():
        for ids in held:
            dense = torch.log_softmax(model(ids[None]).logits[0], -1)[S + W + 1:]
            cache = headwise_cache(model, p)
            got = torch.cat([model(ids[None, t:t + 1], **cache_kwargs(model, cache)).logits[0]
                             for t in range(len(ids))])
            lp = torch.log_softmax(got, -1)[S + W + 1:]
            total += float((dense.exp() * (dense - lp)).sum())
            n += dense.shape[0]
    assert p.measured_kl == pytest.approx(total / n, rel=1e-3)
