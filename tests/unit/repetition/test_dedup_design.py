"""The redesigned de-duplication: repeated keys keep the weight of ``dedup_keep`` keys, and only queries inside
a repetition discount them (``dedup_queries="gated"``), under KV cache, left padding and generate."""

from __future__ import annotations

import math

import pytest
import torch

from sinkscope.errors import InputError
from sinkscope.interventions.patch import RepetitionGate, SinkPatch, apply_patch, dedup_mask, read_patch, save_patch


def test_dedup_mask_keep_and_query_gate_against_loops():
    flags = torch.tensor([[0, 1, 1, 1, 1, 1, 0, 1], [0, 0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    mask2d = torch.tensor([[1] * 8, [0, 1, 1, 1, 1, 1, 1, 1]])
    queries = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)  # the last 4 positions query
    low = torch.finfo(torch.float32).min
    for keep in (1, 2, 3):
        got = dedup_mask(flags, mask2d, 4, torch.float32, keep=keep, queries=queries)[:, 0]
        for b in range(2):
            for i, q in enumerate(range(4, 8)):
                c = int(flags[b, :q + 1].sum())
                want = -math.log(c / keep) if (c > keep and queries[b, i]) else 0.0
                for k in range(8):
                    if k > q or not mask2d[b, k]:
                        assert got[b, i, k] == low
                    elif flags[b, k]:
                        assert got[b, i, k] == pytest.approx(want, abs=1e-6)
                    else:
                        assert got[b, i, k] == 0


def _run(prefix: int, n: int, after: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(4, 99, (prefix,), generator=g).tolist() + [7] * n
            + torch.randint(4, 99, (after,), generator=g).tolist())


def _patch(keep: int, queries: str) -> SinkPatch:
    return SinkPatch([], "x", gate=RepetitionGate(4, 0.9), attention_dedup=True, dedup_keep=keep,
                     dedup_queries=queries)


@torch.no_grad()
def test_runs_up_to_window_plus_keep_are_left_alone(tiny_llama):
    seq = torch.tensor([_run(5, 12, 0)])
    base = tiny_llama(input_ids=seq).logits
    for keep in (1, 3, 6):
        with apply_patch(tiny_llama, _patch(keep, "gated")):
            pat = tiny_llama(input_ids=seq).logits
        changed = (pat - base).abs().amax(-1)[0] > 1e-5
        # the gate opens at the 5th copy (window 4): flagged keys seen by copy j are j - 4; > keep changes it
        first = 5 + 4 + keep  # index of the first query that sees keep + 1 flagged keys
        assert not changed[:first].any() and changed[first:].all(), keep


@torch.no_grad()
def test_gated_queries_leave_text_after_the_run_closer_to_the_original(tiny_llama):
    seq = torch.tensor([_run(5, 14, 10)])
    base = tiny_llama(input_ids=seq).logits.log_softmax(-1)
    kl = {}
    for queries in ("all", "gated"):
        with apply_patch(tiny_llama, _patch(1, queries)):
            lp = tiny_llama(input_ids=seq).logits.log_softmax(-1)
        kl[queries] = float((base.exp() * (base - lp)).sum(-1)[0, -10:].mean())
    inside = {}
    for queries in ("all", "gated"):  # inside the run both discount the same keys for the same queries
        with apply_patch(tiny_llama, _patch(1, queries)):
            inside[queries] = tiny_llama(input_ids=seq[:, :19]).logits
    torch.testing.assert_close(inside["all"], inside["gated"])
    assert kl["gated"] < kl["all"]


@torch.no_grad()
@pytest.mark.parametrize("keep, queries", [(3, "gated"), (2, "all")])
def test_kv_cache_left_padding_and_generate(tiny_llama, padded_and_cached_match, batched_generate_matches, keep,
                                            queries):
    seqs = [_run(5, 14, 0, 1), _run(2, 9, 3, 2), _run(3, 2, 0, 3)]
    with apply_patch(tiny_llama, _patch(keep, queries)):
        padded_and_cached_match(tiny_llama, seqs, 6)
        batched_generate_matches(tiny_llama, seqs, 6)


def test_manifest_round_trip_defaults_and_errors(tiny_dir, tmp_path):
    import json

    from sinkscope.models.load import MANIFEST_NAME

    p = SinkPatch([], str(tiny_dir), gate=RepetitionGate(8, 0.8), attention_dedup=True, dedup_keep=64,
                  dedup_queries="gated")
    back = read_patch(save_patch(p, tmp_path / "p"))
    assert back.dedup_keep == 64 and back.dedup_queries == "gated"
    assert "as 64 keys by queries inside repetitions" in back.describe()
    d = json.loads((tmp_path / "p" / MANIFEST_NAME).read_text())
    del d["dedup_keep"], d["dedup_queries"]  # a manifest written before these fields
    (tmp_path / "p" / MANIFEST_NAME).write_text(json.dumps(d))
    old = read_patch(tmp_path / "p")
    assert old.dedup_keep == 1 and old.dedup_queries == "all"
    with pytest.raises(InputError, match="dedup_queries"):
        _patch(1, "some")
    with pytest.raises(InputError, match="dedup_keep"):
        _patch(-1, "all")


@torch.no_grad()
def test_reach_extends_the_discount_a_few_positions_past_the_run(tiny_llama):
    """dedup_reach = r: the r positions after the run's last open gate still discount; later ones do not. Checked
    against a full forward and against cached single-token steps."""
    seq = torch.tensor([_run(5, 12, 8)])  # run ends at index 16; text at 17..24
    base = tiny_llama(input_ids=seq).logits
    outs = {}
    for reach in (0, 3):
        p = SinkPatch([], "x", gate=RepetitionGate(4, 0.9), attention_dedup=True, dedup_queries="gated",
                      dedup_reach=reach)
        with apply_patch(tiny_llama, p) as h:
            outs[reach] = tiny_llama(input_ids=seq).logits
            # the same sequence one token at a time gives the same logits (the reach carries across calls)
            from sinkscope.compat import cache_kwargs, output_cache

            cache = output_cache(tiny_llama(input_ids=seq[:, :14], use_cache=True))
            for t in range(14, seq.shape[1]):
                step = tiny_llama(input_ids=seq[:, t:t + 1], use_cache=True, **cache_kwargs(tiny_llama, cache))
                cache = output_cache(step)
                torch.testing.assert_close(step.logits[:, 0], outs[reach][:, t], atol=1e-5, rtol=1e-5)
            assert h.n_gated > 0
    # positions 17..19 differ between reach 3 and reach 0 (they discount only with reach 3); the run itself agrees
    torch.testing.assert_close(outs[3][:, :17], outs[0][:, :17])
    assert ((outs[3][0, 17:20] - outs[0][0, 17:20]).abs().amax(-1) > 1e-6).all()
    assert not torch.equal(outs[0], base)


def test_patch_pins_the_base_revision(tiny_dir, tmp_path, monkeypatch):
    """`repeat patch --revision R` records R in the manifest; loading the patch loads the base at R unless the
    caller asks for another revision."""
    from typer.testing import CliRunner

    import sinkscope.interventions.patch as patch_mod
    from sinkscope.cli.repeat import app

    seen: list[dict] = []
    real = patch_mod.load_model

    def spy(spec, **kw):
        seen.append(dict(kw))
        kw.pop("revision", None)  # a local directory has no revisions: load it as it is
        return real(spec, **kw)

    monkeypatch.setattr(patch_mod, "load_model", spy)
    import sinkscope.cli.repeat as cli_repeat
    from sinkscope.cli.common import ModelOptions

    # the tiny local model has no revisions: the CLI's own model options drop it (the patch still records it)
    monkeypatch.setattr(cli_repeat, "_model_options", lambda model, device, dtype, revision, trust: ModelOptions(
        model, device, dtype, None, trust))
    r = CliRunner().invoke(app, ["patch", "--model", str(tiny_dir), "--save", str(tmp_path / "p"), "--revision",
                                 "abc123", "--window", "4"])
    assert r.exit_code == 0, r.output
    assert read_patch(tmp_path / "p").meta["base_revision"] == "abc123"
    patch_mod.load_patched_model(tmp_path / "p")
    patch_mod.load_patched_model(tmp_path / "p", revision="main")
    assert [kw.get("revision") for kw in seen[-2:]] == ["abc123", "main"]
