"""Training metrics: Sink_0 from weights and proxy, slot share, norm ratios, active/dormant labels."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sinkscope.models.tinygpt import TinyGPT, TinyGPTConfig
from sinkscope.tasks.bigram_backcopy import BigramBackcopy
from sinkscope.training.metrics import measure_model, norm_ratio, sink_ratio


def test_sink_ratio_and_norm_ratio() -> None:
    alpha = torch.tensor([[0.9, 0.1], [0.31, 0.3]])  # (L, H)
    assert sink_ratio(alpha, eps=0.3) == pytest.approx(0.5)
    per_sample = torch.tensor([[[0.9, 0.1], [0.2, 0.1]]])  # (L=1, B=2, H=2): the indicator is averaged
    assert sink_ratio(per_sample, eps=0.3) == pytest.approx(0.25)
    x = torch.ones(2, 5, 4)
    x[:, 0] *= 10
    assert norm_ratio(x) == pytest.approx(10.0)


def _eager(model: TinyGPT, idx: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """The model's logits and, per layer, its attention computed here from the raw q, k, v (not by the model's
    attention function or the profiler): ``w`` (B, H, Q, K) as used, ``slot`` (B, H, Q) or None, ``v`` (B, T, H*D)
    and the block output ``resid`` (B, T, d_model)."""
    cfg = model.cfg
    qkv_out: list[torch.Tensor] = []
    block_out: list[torch.Tensor] = []
    hooks = [layer.attn.qkv.register_forward_hook(lambda _m, _i, o: qkv_out.append(o)) for layer in model.layers]
    hooks += [layer.register_forward_hook(lambda _m, _i, o: block_out.append(o)) for layer in model.layers]
    with torch.no_grad():
        logits = model(idx)
    for h in hooks:
        h.remove()
    B, T = idx.shape
    H, D = cfg.n_heads, cfg.d_head
    causal = torch.ones(T, T).tril().bool()
    layers = []
    for layer, (qkv, resid) in enumerate(zip(qkv_out, block_out)):
        q, k, v = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
        z = q @ k.transpose(-1, -2) / math.sqrt(D)  # (B, H, Q, K)
        slot = None
        if cfg.attn_bias == "k":  # a prepended key with zero value: softmax over [bias key, real keys]
            kb = model.layers[layer].attn.k_bias.detach().expand(H, D)  # (H, D)
            zb = torch.einsum("bhqd,hd->bhq", q, kb)[..., None] / math.sqrt(D)
            p = torch.cat([zb, z.masked_fill(~causal, float("-inf"))], -1).softmax(-1)
            w, slot = p[..., 1:], p[..., 0]
        elif cfg.attention == "softmax":
            w = z.masked_fill(~causal, float("-inf")).softmax(-1)
        elif cfg.attention == "softmax1":  # exp(z) / (1 + sum exp(z)); the rest goes to the virtual key
            e = z.exp() * causal
            w = e / (1 + e.sum(-1, keepdim=True))
            slot = 1 - w.sum(-1)
        elif cfg.attention == "relu":  # relu(z) / (t + 1)
            w = F.relu(z) * causal / torch.arange(1, T + 1)[:, None]
        elif cfg.attention == "sigmoid":
            w = torch.sigmoid(z) * causal
        w_o = model.layers[layer].attn.proj.weight.detach()  # (d_model, H * D): head h's slice is W_O^h
        v_out = torch.stack([v[:, h] @ w_o[:, h * D:(h + 1) * D].T for h in range(H)], 1)  # (B, H, T, d_model)
        layers.append({"w": w, "slot": slot, "v": v.transpose(1, 2).reshape(B, T, H * D), "resid": resid,
                       "v_out": v_out})
    return logits, layers


def _first_over_median(norms: torch.Tensor) -> float:
    """(B, T) norms -> mean first-token norm over the median of every other token's."""
    return float(norms[:, 0].mean() / norms[:, 1:].median())


def _between(values: torch.Tensor) -> float:
    """A threshold between the two middle values of ``values``: about half of them lie above it."""
    v = values.flatten().sort().values
    i = len(v) // 2
    return float(v[i - 1] + v[i]) / 2


@pytest.mark.parametrize("kw", [{"attention": "softmax"}, {"attention": "relu"}, {"attention": "sigmoid"},
                                {"attention": "softmax1"}, {"attn_bias": "k"}])
def test_measure_model_against_eager_attention_computed_directly(corpus: Path, kw: dict) -> None:
    """Every attention number of a metrics row against attention weights recomputed from q and k here."""
    task = BigramBackcopy.from_file(corpus, n_chars=20, n_triggers=2)
    torch.manual_seed(0)
    model = TinyGPT(TinyGPTConfig(vocab_size=task.vocab_size, block_size=16, n_layers=2, d_model=16, n_heads=2,
                                  positions="learned", **kw)).eval()
    with torch.no_grad():  # larger logits: heads differ, some sink on the first token and some do not
        model.tok_emb.weight.mul_(4)
    batch = task.batch(0, 0, 6, 16)
    logits, layers = _eager(model, batch.idx)

    proxies = []
    for lay in layers:
        total = lay["w"].abs().sum(-1) + (lay["slot"].abs() if lay["slot"] is not None else 0)  # (B, H, Q)
        proxies.append((lay["w"].abs() / total.clamp_min(1e-12)[..., None],
                        None if lay["slot"] is None else lay["slot"].abs() / total.clamp_min(1e-12)))
    alpha = torch.stack([lay["w"][..., 0].mean(-1) for lay in layers])  # (L, B, H): every query sees key 0
    alpha_proxy = torch.stack([p[..., 0].mean(-1) for p, _ in proxies])
    masses = {}  # (layer, class) -> (H,): the class's queries' proxy mass on token 0 plus the slot's
    for l, (p, slot_p) in enumerate(proxies):
        for cls, queries in batch.classes.items():
            q = queries[:, None, :].float()  # (B, 1, Q)
            mass = (p[..., 0] * q).sum((0, 2)) / q.sum((0, 2)).clamp_min(1)
            if slot_p is not None:
                mass = mass + (slot_p * q).sum((0, 2)) / q.sum((0, 2)).clamp_min(1)
            masses[l, cls] = mass
    eps = _between(alpha_proxy)
    threshold = _between(torch.cat(list(masses.values())))
    row = measure_model(model, batch, eps=eps, dormant_threshold=threshold)

    nll = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="none").view_as(batch.targets)
    assert row["loss"] == pytest.approx(float((nll * batch.loss_mask).sum() / batch.loss_mask.sum()), rel=1e-6)
    assert row["sink_ratio"] == pytest.approx(float((alpha > eps).float().mean()))
    assert row["sink_ratio_proxy"] == pytest.approx(float((alpha_proxy > eps).float().mean()))
    assert 0.2 < row["sink_ratio_proxy"] < 0.8  # eps splits the heads: a wrong alpha moves this share
    torch.testing.assert_close(torch.tensor(row["bos_attention"]), alpha.mean(1), atol=6e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(row["bos_attention_proxy"]), alpha_proxy.mean(1), atol=6e-5, rtol=0)
    if layers[0]["slot"] is not None:
        slot = torch.stack([lay["slot"].mean(-1) for lay in layers])  # (L, B, H)
        assert row["sink_ratio_slot"] == pytest.approx(float((slot > eps).float().mean()))
        torch.testing.assert_close(torch.tensor(row["slot_attention"]), slot.mean(1), atol=6e-5, rtol=0)
    else:
        assert "sink_ratio_slot" not in row
    for l, lay in enumerate(layers):
        assert row["bos_value_norm"][l] == pytest.approx(_first_over_median(lay["v"].norm(dim=-1)), abs=1e-4)
        resid = lay["resid"].norm(dim=-1)  # (B, T)
        assert row["bos_residual_norm"][l] == pytest.approx(_first_over_median(resid), abs=1e-4)
        assert row["bos_residual_norm_mean"][l] == pytest.approx(float(resid[:, 0].mean() / resid[:, 1:].mean()),
                                                                 abs=1e-4)  # Gu et al.: over the mean
        for h in range(model.cfg.n_heads):  # Guo et al.'s value drain: ||W_O^h v_h||, first over median
            want = _first_over_median(lay["v_out"][:, h].norm(dim=-1))
            assert row["bos_value_out_norm"][l][h] == pytest.approx(want, abs=1e-4)
        for cls in batch.classes:
            mass = masses[l, cls]
            for h in range(model.cfg.n_heads):
                assert row["head_bos_mass"][f"L{l}H{h}"][cls] == pytest.approx(float(mass[h]), abs=6e-5)
                want = "dormant" if float(mass[h]) > threshold else "active"
                assert row["heads"][f"L{l}H{h}"][cls] == want
    labels = [label for per_class in row["heads"].values() for label in per_class.values()]
    assert "dormant" in labels and "active" in labels  # the threshold splits the heads


@pytest.mark.parametrize("kw,slot", [({"attention": "relu"}, False), ({"sink_token": True}, True),
                                      ({"attention": "softmax1"}, True), ({"attn_bias": "kv"}, True)])
def test_measure_model_rows(corpus: Path, kw: dict, slot: bool) -> None:
    task = BigramBackcopy.from_file(corpus, n_chars=20, n_triggers=2)
    model = TinyGPT(TinyGPTConfig(vocab_size=task.vocab_size, block_size=16, n_layers=2, d_model=16, n_heads=2, **kw))
    row = measure_model(model, task.batch(0, 0, 4, 16), eps=0.3)
    assert ("sink_ratio_slot" in row) == slot
    assert len(row["bos_attention"]) == 2 and len(row["bos_value_norm"]) == 2 and len(row["bos_residual_norm"]) == 2
    assert set(row["heads"]) == {"L0H0", "L0H1", "L1H0", "L1H1"}
    assert all(v in ("active", "dormant") for labels in row["heads"].values() for v in labels.values())
    if kw.get("attention") == "relu":  # weights used are not rows summing to one; the proxy renormalises them
        assert row["bos_attention"] != row["bos_attention_proxy"]


def test_absolute_residual_norms_match_the_ratio(corpus: Path) -> None:
    task = BigramBackcopy.from_file(corpus, n_chars=20, n_triggers=2)
    model = TinyGPT(TinyGPTConfig(vocab_size=task.vocab_size, block_size=16, n_layers=3, d_model=16, n_heads=2))
    row = measure_model(model, task.batch(0, 0, 8, 16))
    assert len(row["bos_residual_abs"]) == len(row["median_residual_abs"]) == 3
    for ratio, bos, med in zip(row["bos_residual_norm"], row["bos_residual_abs"], row["median_residual_abs"]):
        assert bos > 0 and med > 0 and ratio == pytest.approx(bos / med, rel=1e-3)


def test_relu_flat_divides_every_row_alike() -> None:
    from sinkscope.models.attention import ATTENTION_FNS

    q, k = torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    mask = torch.ones(5, 5).tril().bool()
    relu, flat = ATTENTION_FNS["relu"](q, k, mask), ATTENTION_FNS["relu_flat"](q, k, mask)
    n_visible = torch.arange(1, 6, dtype=torch.float32)[:, None]  # 1 / (t + 1) for relu, 1 / 5 for every flat row
    torch.testing.assert_close(flat * 5, relu * n_visible)
    assert (flat[..., ~mask] == 0).all()


@pytest.mark.parametrize("kind", ["softmax", "sigmoid_norm"])
def test_score_budget_share_is_the_weight_used(corpus: Path, kind: str) -> None:
    from sinkscope.training.diagnose import score_budget
    from sinkscope.training.metrics import capture_tinygpt

    task = BigramBackcopy.from_file(corpus, n_chars=20, n_triggers=2)
    torch.manual_seed(0)
    model = TinyGPT(TinyGPTConfig(vocab_size=task.vocab_size, block_size=16, n_layers=2, d_model=16, n_heads=2,
                                  attention=kind, positions="rope")).eval()
    batch = task.batch(0, 0, 8, 16)
    budget = score_budget(model, batch, layer=1, buckets=1)
    with torch.no_grad(), capture_tinygpt(model) as cap:
        model(batch.idx)
    used = cap.weights[1][..., 0]  # (B, H, T): weight on the first token as the model used it
    for cls, rows in budget["classes"].items():
        sel = batch.classes[cls].clone()
        sel[:, 0] = False  # the buckets cover query positions 1..T-1
        expected = used[sel[:, None, :].expand_as(used)].mean()
        assert rows[0]["share_first"] == pytest.approx(float(expected), abs=2e-4)


def test_residual_parts_output_ratio_is_the_metrics_ratio(corpus: Path) -> None:
    from sinkscope.training.diagnose import residual_parts

    task = BigramBackcopy.from_file(corpus, n_chars=20, n_triggers=2)
    model = TinyGPT(TinyGPTConfig(vocab_size=task.vocab_size, block_size=16, n_layers=2, d_model=16,
                                  attention="relu")).eval()
    batch = task.batch(0, 0, 8, 16)
    parts = residual_parts(model, batch, layer=0)["parts"]
    assert set(parts) == {"input", "attention", "mlp", "output"}
    row = measure_model(model, batch)
    assert parts["output"]["ratio"] == pytest.approx(row["bos_residual_norm"][0], abs=2e-3)
    assert parts["output"]["first"] == pytest.approx(row["bos_residual_abs"][0], abs=2e-3)


@pytest.mark.parametrize("kw", [{"attention": "softmax"}, {"attn_bias": "k"}, {"attention": "relu"}])
def test_attention_targets_shares_sum_to_one(corpus: Path, kw: dict) -> None:
    from sinkscope.training.diagnose import attention_targets

    task = BigramBackcopy.from_file(corpus, n_chars=20, n_triggers=2)
    model = TinyGPT(TinyGPTConfig(vocab_size=task.vocab_size, block_size=16, n_layers=2, d_model=16, n_heads=2,
                                  **kw)).eval()
    batch = task.batch(0, 0, 8, 16)
    out = attention_targets(model, batch, layer=1)
    lay = _eager(model, batch.idx)[1][1]  # layer 1, recomputed from q and k
    total = lay["w"].abs().sum(-1) + (lay["slot"] if lay["slot"] is not None else 0)  # (B, H, Q)
    proxy_first = lay["w"][..., 0].abs() / total.clamp_min(1e-12)
    attends = (total > 0).float()  # a ReLU row can be all zero: it then attends nowhere
    for cls, shares in out["classes"].items():
        sel = batch.classes[cls].clone()
        sel[:, 0] = False  # queries at positions >= 1
        m = sel[:, None, :].expand_as(proxy_first)
        assert shares["first"] == pytest.approx(float(proxy_first[m].mean()), abs=1e-4)
        assert sum(shares.values()) == pytest.approx(float(attends[m].mean()), abs=2e-3)  # proxy rows sum to 1 or 0
        assert (shares["slot"] > 0) == (kw.get("attn_bias") == "k")
    if kw.get("attention") == "relu":
        assert float(attends.mean()) < 1  # some rows do attend nowhere here: the sum is not trivially one


def test_dormant_default_is_guos_criterion(corpus: Path) -> None:
    """A head is dormant above 0.89 (Guo et al.'s code) by default; 0.5 remains an option."""
    from sinkscope.training.config import TrainConfig

    task = BigramBackcopy.from_file(corpus, n_chars=20, n_triggers=2)
    model = TinyGPT(TinyGPTConfig(vocab_size=task.vocab_size, block_size=16, n_layers=1, d_model=16, n_heads=1,
                                  positions="none"))
    s_dir = torch.tensor([1.0, -1.0] * 8)  # shared by every token: it makes the (constant) query
    d_dir = torch.tensor([1.0, 1.0, -1.0, -1.0] * 4)  # +d for BOS, -d for the rest: it makes the key
    c = 0.6  # the logit of BOS exceeds every other key's: masses on BOS ~0.68 (trigger) and ~0.72 (non-trigger)
    with torch.no_grad():
        model.tok_emb.weight.copy_((s_dir - d_dir).expand_as(model.tok_emb.weight))
        model.tok_emb.weight[task.bos_id] = s_dir + d_dir
        qkv = model.layers[0].attn.qkv.weight  # (3 * 16, 16): W_q, W_k, W_v
        qkv.zero_()
        qkv[:16] = c * torch.ones(16, 1) * s_dir[None] / 16 * 2 ** 0.5
        qkv[16:32] = c * torch.ones(16, 1) * d_dir[None] / 16 * 2 ** 0.5
    batch = task.batch(0, 0, 4, 16)
    mass = measure_model(model, batch)["head_bos_mass"]["L0H0"]
    assert TrainConfig().dormant_threshold == 0.89
    assert any(0.5 < m < 0.89 for m in mass.values()), mass  # a class the two criteria label differently
    for threshold in (0.89, 0.5, None):
        kw = {} if threshold is None else {"dormant_threshold": threshold}
        labels = measure_model(model, batch, **kw)["heads"]["L0H0"]
        limit = 0.89 if threshold is None else threshold
        assert labels == {c: "dormant" if m > limit else "active" for c, m in mass.items()}
