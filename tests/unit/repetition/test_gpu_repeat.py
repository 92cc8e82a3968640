"""The repetition patch and protocol on CUDA (skipped without a GPU): the patched model gives on the GPU what it
gives on the CPU (logits and greedy answers), in fp32 and bf16, and the protocol and harm measurement run there."""

from __future__ import annotations

import pytest
import torch

from sinkscope.interventions.patch import DirectionRule, NeuronRule, RepetitionGate, SinkPatch, apply_patch
from sinkscope.models.generate import greedy_continue


def _patch(model) -> SinkPatch:
    d = model.config.hidden_size
    u = torch.randn(d, generator=torch.Generator().manual_seed(0))
    return SinkPatch([NeuronRule(0, [1, 2], [0.0, 0.0], [0.0, 0.0])], "x",
                     directions=[DirectionRule(1, (u / u.norm()).tolist(), -1e9, 0.5)], gate=RepetitionGate(4, 0.9),
                     attention_dedup=True, dedup_keep=2, dedup_queries="gated")


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(4, 99, (k,), generator=g).tolist() + [7] * n for k, n in ((3, 14), (6, 9), (2, 3))]


@pytest.mark.gpu
@torch.no_grad()
def test_patch_on_cuda_matches_cpu(tiny_llama):
    from sinkscope.inputs import pad_batch

    patch = _patch(tiny_llama)
    ids, mask = pad_batch(_prompts(), 0, side="left")
    with apply_patch(tiny_llama, patch):
        cpu = tiny_llama(input_ids=ids, attention_mask=mask).logits
        cpu_gen = greedy_continue(tiny_llama, _prompts(), max_new_tokens=6, batch_size=3, pad_token_id=0)
    gpu_model = tiny_llama.to("cuda")
    with apply_patch(gpu_model, patch) as h:
        gpu = gpu_model(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits
        gpu_gen = greedy_continue(gpu_model, _prompts(), max_new_tokens=6, batch_size=3, pad_token_id=0)
        assert h.n_gated > 0 and h.n_clamped > 0
    real = mask.bool()
    torch.testing.assert_close(gpu.cpu()[real], cpu[real], atol=2e-4, rtol=2e-4)
    assert gpu_gen == cpu_gen
    bf = gpu_model.to(torch.bfloat16)
    with apply_patch(bf, patch):
        got = bf(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits.float().cpu()
    assert (got[real] - cpu[real]).abs().max() < 0.1 * cpu[real].abs().max()


@pytest.mark.gpu
def test_grid_and_harm_on_cuda_match_cpu(tiny_llama, tiny_tok, tmp_path):
    """The grid's answers and the harm measurement on CUDA equal the CPU's (the gate opens at the same places)."""
    from sinkscope.repetition.grid import NO_PATCH, GridPlan, run_grid
    from sinkscope.repetition.harm import CLOSE, OPEN, harm_effects, load_harm_set

    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "a.txt").write_text(f"family: count\nformat: text\n---\nthe {OPEN}{' '.join(['dog'] * 9)}"
                                          f"{CLOSE} cat tree\n")
    docs = load_harm_set(tmp_path / "h")
    plan = GridPlan(["cat", "dog"], ["instruct", "bare"], [8], [NO_PATCH, "p"], max_new_tokens=4, batch_size=4)
    patch = _patch(tiny_llama)
    cpu_cells = run_grid(tiny_llama, tiny_tok, plan, {NO_PATCH: None, "p": patch}, tmp_path / "cpu").cells
    (cpu_eff,) = harm_effects(tiny_llama, tiny_tok, {"p": patch}, docs)["p"]
    model = tiny_llama.to("cuda")
    cells = run_grid(model, tiny_tok, plan, {NO_PATCH: None, "p": patch}, tmp_path / "gpu").cells
    key = lambda c: (c["variant"], c["form"], c["n"], c["word"], c["verdict"], c["continuation"])  # noqa: E731
    assert [key(c) for c in cells] == [key(c) for c in cpu_cells]
    (eff,) = harm_effects(model, tiny_tok, {"p": patch}, docs)["p"]
    assert eff.gate_opened == cpu_eff.gate_opened > 0 and eff.edits == cpu_eff.edits
    assert eff.kl_inside == pytest.approx(cpu_eff.kl_inside, rel=1e-3, abs=1e-7)
