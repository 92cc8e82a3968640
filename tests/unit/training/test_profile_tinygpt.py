"""profile_sinks on tinygpt: every attention kind against a plain reference from the capture points, the HF
path on a weight-identical Llama, the training metrics, and the scan outputs (profile.json, heads.csv, plots)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sinkscope.collectors.tinygpt import capture_tinygpt
from sinkscope.errors import InputError
from sinkscope.inputs import TokenBatch
from sinkscope.models.tinygpt import TinyGPT, TinyGPTConfig, attention_mask
from sinkscope.profile import profile_sinks

TOL = 1e-5
V = 17

KINDS = {
    "softmax": {}, "softmax1": {"attention": "softmax1"}, "sigmoid": {"attention": "sigmoid"},
    "sigmoid_norm": {"attention": "sigmoid_norm"}, "relu": {"attention": "relu"}, "elu1": {"attention": "elu1"},
    "elu1_norm": {"attention": "elu1_norm"}, "sink_token": {"sink_token": True}, "k_bias": {"attn_bias": "k"},
    "v_bias": {"attn_bias": "v"}, "kv_bias_shared": {"attn_bias": "kv", "attn_bias_shared": True},
    "sigmoid_kbias_rope_window": {"attention": "sigmoid", "attn_bias": "k", "positions": "rope", "window": 4},
    "relu_sink_alibi": {"attention": "relu", "sink_token": True, "positions": "alibi"},
}
SLOT_KINDS = {"softmax1", "sink_token", "k_bias", "kv_bias_shared", "sigmoid_kbias_rope_window", "relu_sink_alibi"}


def _model(**kw) -> TinyGPT:
    torch.manual_seed(0)
    base = dict(vocab_size=V, block_size=12, n_layers=2, d_model=16, n_heads=2)
    return TinyGPT(TinyGPTConfig(**{**base, **kw})).eval()


def _batch() -> TokenBatch:
    g = torch.Generator().manual_seed(3)
    return TokenBatch([torch.randint(0, V, (n,), generator=g).tolist() for n in (12, 7, 10)], "ids")


def _reference(model: TinyGPT, seq: list[int]) -> dict[str, np.ndarray]:
    """One sample alone (no padding), straight from the capture points: (L, H, T) alpha and proxy, (L, H) slot
    mass and proxy, (L, H, T) value norms, (L, T) residual norms, (L, H, Q) raw row sums, (L, H) rows with any
    weight."""
    with torch.no_grad(), capture_tinygpt(model) as cap:
        model(torch.tensor([seq]))
    n = len(seq)
    vis = attention_mask(n, window=model.cfg.window).double()  # (Q, K)
    out: dict[str, list] = {k: [] for k in ("alpha", "proxy", "slot", "slot_proxy", "value", "resid", "rowsum",
                                             "live")}
    for l, w in enumerate(cap.weights):
        w = w[0].double()  # (H, Q, K)
        slot = cap.slots[l][0].double() if cap.slots else torch.zeros(w.shape[:2], dtype=torch.double)
        total = w.sum(-1) + slot  # (H, Q): every weight here is >= 0
        live = total > 0  # a relu row can be all zero: the head does nothing there, its proxy row is 0 too
        total = torch.where(live, total, 1.0)
        wn, sn = w / total[..., None], slot / total
        out["alpha"].append(((w * vis).sum(1) / vis.sum(0)).numpy())
        out["proxy"].append(((wn * vis).sum(1) / vis.sum(0)).numpy())
        out["slot"].append(slot.mean(-1).numpy())
        out["slot_proxy"].append(sn.mean(-1).numpy())
        out["rowsum"].append(w.sum(-1).numpy())
        out["live"].append(live.sum(-1).double().numpy())
        out["value"].append(cap.values[l][0].norm(dim=-1).numpy())
        out["resid"].append(cap.resid[l][0].norm(dim=-1).numpy())
    return {k: np.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("name", list(KINDS))
def test_profile_matches_capture_point_reference(name: str) -> None:
    model = _model(**KINDS[name])
    batch = _batch()
    prof = profile_sinks(model, batch, batch_size=2)  # padded batches: the long sample beside a short one
    assert prof.alpha_proxy is not None and prof.alpha.shape == (3, 2, 2, 12)
    slot = name in SLOT_KINDS
    assert (prof.sink_mass is not None) == slot and (prof.sink_mass_proxy is not None) == slot
    for i, seq in enumerate(batch.sequences):
        n, ref = len(seq), _reference(model, seq)
        np.testing.assert_allclose(prof.alpha[i, ..., :n], ref["alpha"], atol=TOL, rtol=0)
        np.testing.assert_allclose(prof.alpha_proxy[i, ..., :n], ref["proxy"], atol=TOL, rtol=0)
        np.testing.assert_allclose(prof.value_norm[i, ..., :n], ref["value"], atol=TOL, rtol=1e-5)
        np.testing.assert_allclose(prof.residual_norm[i, :, :n], ref["resid"], atol=TOL, rtol=1e-5)
        assert np.isnan(prof.alpha[i, ..., n:]).all() and np.isnan(prof.residual_norm[i, :, n:]).all()
        vis = attention_mask(n, window=model.cfg.window).numpy()
        count = vis.sum(0)  # queries that see key k
        # the proxy's rows sum to one: sum_k alpha_proxy[k] * count[k] + n * slot share = n queries
        # (less the all-zero rows a relu head may have)
        got_rows = (prof.alpha_proxy[i, ..., :n] * count).sum(-1)
        mass = prof.sink_mass_proxy[i] if slot else 0.0
        np.testing.assert_allclose(got_rows + n * mass, ref["live"], rtol=1e-6)
        assert ref["live"].sum() > 0.8 * ref["live"].size * n
        # the raw alpha is what the weights say: the same identity gives the weights' own row sums
        np.testing.assert_allclose((prof.alpha[i, ..., :n] * count).sum(-1), ref["rowsum"].sum(-1), rtol=1e-5)
        if slot:
            np.testing.assert_allclose(prof.sink_mass[i], ref["slot"], atol=TOL, rtol=0)
            np.testing.assert_allclose(prof.sink_mass_proxy[i], ref["slot_proxy"], atol=TOL, rtol=0)
    normalised = model.layers[0].attn.fn.normalised and not slot
    if normalised:
        np.testing.assert_allclose(prof.alpha_proxy, prof.alpha, atol=1e-6)
    elif name in ("sigmoid", "relu", "elu1"):  # rows do not sum to one: the two alphas really differ
        assert np.nanmax(np.abs(prof.alpha_proxy - prof.alpha)) > 0.05
    s = prof.summary()
    assert s["sink_ratio_proxy"] == prof.sink_ratio(0, proxy=True)
    assert ("sink_ratio_slot" in s) == slot


def _large_slot(name: str) -> TinyGPT:
    """A model whose sink slot takes almost all attention: queries are constant (q = 1), real keys give
    logit ~0 (or very negative for softmax + 1), the slot key a large logit."""
    model = _model(bias=True, **KINDS[name])
    d = model.cfg.d_model
    with torch.no_grad():
        for block in model.layers:
            a = block.attn
            a.qkv.weight[: 2 * d] = 0  # q and k ignore the input
            a.qkv.bias[:d] = 1.0
            a.qkv.bias[d: 2 * d] = -3.0 if name == "softmax1" else 0.0
            if a.k_bias is not None:
                a.k_bias.fill_(3.0)
    return model


@pytest.mark.parametrize("name", ["softmax1", "k_bias", "kv_bias_shared"])
def test_large_slot_is_reported_as_sink_mass(name: str) -> None:
    prof = profile_sinks(_large_slot(name), _batch())
    assert prof.sink_mass is not None and prof.sink_mass_proxy is not None
    assert np.nanmin(prof.sink_mass) > 0.9 and np.nanmin(prof.sink_mass_proxy) > 0.9
    assert prof.slot_sink_ratio() == 1.0 and prof.sink_ratio(0) == 0.0  # the slot, not the first token, sinks
    s = prof.summary()
    assert s["sink_ratio_slot"] == 1.0 and s["sink_ratio_slot_proxy"] == 1.0
    assert min(s["learned_sink_mass_by_layer"]) > 0.9
    assert all(r["learned_sink_mass"] > 0.9 for r in prof.heads_rows())


def test_llama_shaped_tinygpt_matches_the_hf_path(llama_twin) -> None:
    """A rope/rmsnorm/swiglu tinygpt and the Llama with its weights: both profiler paths give the same numbers."""
    model = _model(positions="rope", norm="rmsnorm", mlp_kind="swiglu", d_ff=24)
    with torch.no_grad():  # a stronger sink: first-token keys differ, so alpha_0 is not uniform
        model.tok_emb.weight.mul_(3)
    hf = llama_twin(model, max_positions=12)
    batch = _batch()
    ours, theirs = profile_sinks(model, batch, batch_size=2), profile_sinks(hf, batch, batch_size=2)
    for f in ("alpha", "value_norm", "residual_norm", "cos_first", "cos_other", "out_norm", "mlp_top_act",
              "mlp_top_other"):
        np.testing.assert_allclose(getattr(ours, f), getattr(theirs, f), atol=1e-4, rtol=1e-4, err_msg=f)
    np.testing.assert_array_equal(ours.mlp_top_idx, theirs.mlp_top_idx)
    assert ours.sink_ratio(0) == theirs.sink_ratio(0)
    np.testing.assert_allclose(ours.residual_ratio(), theirs.residual_ratio(), rtol=1e-4)
    assert [m["dims"] for m in ours.massive] == [m["dims"] for m in theirs.massive]
    np.testing.assert_allclose(ours.alpha_proxy, ours.alpha, atol=1e-6)  # softmax: the proxy is alpha
    assert "sink_ratio_proxy" not in theirs.summary() and theirs.alpha_proxy is None


def test_scan_outputs_and_unavailable_fields(tmp_path: Path) -> None:
    from sinkscope.io import save_figure_atomic, write_csv_atomic, write_json_atomic
    from sinkscope.viz.plots import PLOTS

    prof = profile_sinks(_model(attention="sigmoid", attn_bias="k", mlp=False), _batch())
    result = prof.to_json()
    write_json_atomic(tmp_path / "profile.json", result)
    write_csv_atomic(tmp_path / "heads.csv", prof.heads_rows())
    for name, plot in PLOTS.items():
        save_figure_atomic(tmp_path / name, plot(prof))
        assert (tmp_path / name).stat().st_size > 1000
    back = json.loads((tmp_path / "profile.json").read_text())
    assert back["model"]["model_type"] == "tinygpt" and back["model"]["attention"] == "sigmoid"
    assert back["model"]["config"]["attn_bias"] == "k" and back["model"]["learned_sinks"] is True
    for key in ("sink_ratio", "sink_ratio_proxy", "sink_ratio_slot", "sink_ratio_slot_proxy", "alpha_0_proxy",
                "attention_on_first_by_layer_proxy", "learned_sink_mass_proxy_by_layer"):
        assert key in back, key
    assert "mlp" in back["unavailable"]["mlp_top_*"] and back["mlp_first_token_top_neurons"] == []
    header = (tmp_path / "heads.csv").read_text().splitlines()[0].split(",")
    assert {"alpha_0", "alpha_0_proxy", "learned_sink_mass", "learned_sink_mass_proxy"} <= set(header)
    assert np.isfinite(prof.cos_first).all() and np.isfinite(prof.out_norm).all()
    with pytest.raises(InputError, match="no row-normalised proxy"):
        replace(prof, alpha_proxy=None).sink_ratio(0, proxy=True)
    with pytest.raises(InputError, match="longer than the model's context"):
        profile_sinks(_model(), [[1] * 13])
    with pytest.raises(InputError, match="vocab_size"):
        profile_sinks(_model(), [[V]])
    assert not math.isnan(prof.summary()["sink_ratio_slot"])


def test_trained_run_directory_profiles_like_its_final_row(corpus: Path, tmp_path: Path) -> None:
    from sinkscope.training.config import config_from_dict
    from sinkscope.training.loop import build_task, evaluation_batch, train
    from sinkscope.training.run import load_trained

    from .conftest import tiny_dict

    cfg = config_from_dict(tiny_dict(corpus, model={"attention": "sigmoid", "attn_bias": "k"},
                                     train={"steps": 10, "eval_every": 5, "ckpt_every": 5}))
    train(cfg, tmp_path / "run")
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    model, run_cfg = load_trained(tmp_path / "run")
    prof = profile_sinks(model, evaluation_batch(build_task(run_cfg.data), run_cfg).idx.tolist())
    assert final["step"] == 10 and prof.model["attention"] == "sigmoid"
    assert prof.sink_ratio(0) == final["sink_ratio"] and prof.sink_ratio(0, proxy=True) == final["sink_ratio_proxy"]
    np.testing.assert_allclose(prof.alpha_mean(0, proxy=True), final["bos_attention_proxy"], atol=6e-5)
    np.testing.assert_allclose(prof.sink_mass.mean(0), final["slot_attention"], atol=6e-5)
    with pytest.raises(InputError, match="not a sinkscope train run directory"):
        load_trained(tmp_path)
