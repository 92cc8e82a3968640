"""The conditional sink-neuron patch on a tiny Llama: hook placement, relative positions under left padding and
KV cache, generate, save/restore round trip."""

from __future__ import annotations

import json

import torch

import sinkscope
from sinkscope.inputs import pad_batch
from sinkscope.interventions.patch import (
    NeuronRule,
    SinkPatch,
    apply_patch,
    read_patch,
    relative_positions,
    save_patch,
)
from sinkscope.models.load import MANIFEST_NAME


def _patch(model) -> SinkPatch:
    """Clamp every neuron of both layers above |a| > 0.002 (fires almost everywhere): a strong, visible edit."""
    F = model.config.intermediate_size
    rules = [NeuronRule(l, list(range(F)), [0.002] * F, [0.0] * F) for l in range(model.config.num_hidden_layers)]
    return SinkPatch(rules, "unused")


def test_relative_positions():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert relative_positions(5, mask, None, 0).tolist() == [[-1, -1, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert relative_positions(1, mask, None, 4).tolist() == [[2], [4]]  # decoding step with a cache
    assert relative_positions(2, None, None, 3).tolist() == [[3, 4]]


@torch.no_grad()
def test_first_token_untouched_rest_patched(tiny_llama):
    ids = torch.randint(4, 99, (1, 9))
    base = tiny_llama(input_ids=ids).logits
    with apply_patch(tiny_llama, _patch(tiny_llama)) as h:
        pat = tiny_llama(input_ids=ids).logits
        assert h.n_clamped > 0
    torch.testing.assert_close(pat[:, 0], base[:, 0])
    assert (pat[:, 1:] - base[:, 1:]).abs().max() > 1e-3
    torch.testing.assert_close(tiny_llama(input_ids=ids).logits, base)  # hooks removed


@torch.no_grad()
def test_kv_cache_and_left_padding_match_full_forward(tiny_llama, padded_and_cached_match):
    seqs = [torch.randint(4, 99, (n,)).tolist() for n in (11, 7, 4)]
    with apply_patch(tiny_llama, _patch(tiny_llama)):
        padded_and_cached_match(tiny_llama, seqs, 3)


@torch.no_grad()
def test_generate_batched_equals_unbatched(tiny_llama, batched_generate_matches):
    seqs = [torch.randint(4, 99, (n,)).tolist() for n in (9, 5)]
    with apply_patch(tiny_llama, _patch(tiny_llama)):
        patched = batched_generate_matches(tiny_llama, seqs, 6)
    ids, mask = pad_batch(seqs, 0, side="left")
    plain = tiny_llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                pad_token_id=0)[:, ids.shape[1]:]
    assert plain.tolist() != patched.tolist()  # the patch does change this tiny model


@torch.no_grad()
def test_save_and_restore_round_trip(tiny_llama, tiny_dir, tmp_path):
    patch = SinkPatch(_patch(tiny_llama).rules, str(tiny_dir), meta={"why": "test"})
    out = save_patch(patch, tmp_path / "patched")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["kind"] == "repeat_patch" and manifest["base_model"] == str(tiny_dir.resolve())
    assert read_patch(out).rules == patch.rules
    model, tok = sinkscope.load_model(out)
    assert model.sinkscope_patch.patch.rules == patch.rules
    ids = torch.randint(4, 99, (2, 8))
    with apply_patch(tiny_llama, patch):
        expected = tiny_llama(input_ids=ids).logits
    torch.testing.assert_close(model(input_ids=ids).logits, expected)
    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                         pad_token_id=0)
    assert gen.shape == (2, 11)
