"""The sink profiler's tinygpt path: `profile_sinks` on a TinyGPT, from the model's own capture points.

Hugging Face models reach the profiler through their attention function (`sinkscope.capture`); tinygpt computes
its attention weights itself, with operations whose rows need not sum to one (sigmoid, relu, elu1, softmax + 1)
and optional sink slots (a learned key bias, a learnable sink token, softmax + 1's virtual key). This module
fills the same per-sample arrays of a `SinkProfile` from forward hooks on tinygpt's capture points
(``layers.{i}.attn.capture_weights`` / ``capture_slot`` / ``capture_values``, ``layers.{i}.capture_resid``) and
on its q/k/v projection, output projection and MLP down projection; no module's forward is replaced. Each
layer's ``(B, H, Q, K)`` weights are reduced to column sums as soon as the layer has run (one layer's weights
alive at a time; tinygpt sizes make that matrix small).

Two sink scores per key (RESEARCH.md §1 and §4):

- ``alpha``: from the weights the model actually used, ``A[t, k]`` averaged over the real queries ``t`` that can
  see ``k``. For unnormalised kinds rows need not sum to one; the sink slot's mean weight is ``sink_mass``
  (reported like gpt-oss's learned sink).
- ``alpha_proxy``: the same from Gu et al.'s row-normalised proxy ``|w| / sum |w|`` (the sum over real keys plus
  the slot, `sinkscope.models.attention.row_normalised`), with the slot's share in ``sink_mass_proxy``.
  For softmax without a slot the two are equal.

Shapes: N samples, B batch rows, L layers, H heads, Q queries, K keys, T tokens, D head dim.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sinkscope.capture import forward_hooks
from sinkscope.errors import InputError
from sinkscope.inputs import TokenBatch
from sinkscope.metrics.massive import MassiveTracker
from sinkscope.models.attention import row_normalised
from sinkscope.models.tinygpt import TinyGPT, attention_mask, rope
from sinkscope.profile import TOP_NEURONS, SinkProfile, _pad_right, mlp_top_neurons, versions


def is_tinygpt(model: nn.Module) -> bool:
    """True for a :class:`TinyGPT` (the profiler then takes this module's path)."""
    return isinstance(model, TinyGPT)


def has_slot(model: TinyGPT) -> bool:
    """Whether attention rows carry a sink slot: a key bias, a learnable sink token or softmax + 1."""
    cfg = model.cfg
    return cfg.attn_bias in ("k", "kv") or cfg.sink_token or model.layers[0].attn.fn.virtual_sink


def tinygpt_info(model: TinyGPT) -> dict[str, Any]:
    """Architecture facts recorded with a profile (the keys of `sinkscope.profile.model_info`, plus the config)."""
    cfg = model.cfg
    src = getattr(model, "sinkscope_source", None)
    return {
        "name": "tinygpt", "source": src.to_json() if src is not None else {"kind": "object"},
        "model_type": "tinygpt", "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_heads,
        "d_model": cfg.d_model, "d_head": cfg.d_head, "positions": cfg.positions, "max_positions": cfg.block_size,
        "attention_layers": list(range(cfg.n_layers)), "learned_sinks": bool(has_slot(model)),
        "output_gate": False, "n_params": int(sum(p.numel() for p in model.parameters())),
        "attention": cfg.attention, "attention_normalised": bool(model.layers[0].attn.fn.normalised),
        "config": asdict(cfg),
    }


def qk_cosines(q: Tensor, k: Tensor, visible: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sums of cos(q_t, k_first) and of the mean cos(q_t, k_j), j visible and j != first, over real queries.

    Same definition as `sinkscope.metrics.attention_stats` (first = position 0, right-padded rows): a query
    t != 0 counts when it sees at least one key other than the first. For the elu1 kinds these are cosines of
    the raw q and k, not of the kernel features phi(q), phi(k) the scores use.

    Args:
        q, k: ``(B, H, T, D)`` queries and keys as the scores use them (after RoPE).
        visible: ``(T, T)`` bool, query t may attend key j.
        valid: ``(B, T)`` bool, real tokens.
    Returns:
        ``cos_first (B, H)``, ``cos_other (B, H)`` (sums) and ``n (B,)`` (the number of queries summed).
    """
    qf, kf = q.float(), k.float()
    qn = qf / qf.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    kn = kf / kf.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    cos = qn @ kn.transpose(-1, -2)  # (B, H, T, T)
    vis = visible.to(cos.dtype)
    c_first = cos[..., 0]  # (B, H, T)
    first_seen = vis[:, 0]  # (T,)
    c_other = ((cos * vis).sum(-1) - c_first * first_seen) / (vis.sum(-1) - first_seen).clamp_min(1)
    n_other = visible.sum(-1) - visible[:, 0].long()  # (T,)
    t = torch.arange(visible.shape[0], device=visible.device)
    w = ((n_other > 0) & (t != 0))[None, :] & valid  # (B, T)
    wf = w[:, None, :].to(cos.dtype)
    return ((c_first * wf).sum(-1).double(), (c_other * wf).sum(-1).double(), w.sum(-1).double())


class _TinyCollector:
    """Hook callbacks for one TinyGPT forward; keeps per-layer reductions (no layer's weights outlive it)."""

    def __init__(self, model: TinyGPT, tick: Any = None) -> None:
        self.model, self.cfg, self.tick = model, model.cfg, tick
        self.valid: Tensor | None = None  # (B, T) bool
        self.visible: Tensor | None = None  # (T, T) bool, real queries x real keys
        self.massive = MassiveTracker()
        self.pending: dict[int, dict[str, Tensor]] = {}
        self.attn: dict[int, dict[str, Tensor]] = {}
        self.residual: dict[int, Tensor] = {}
        self.mlp: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    def start(self, valid: Tensor) -> None:
        self.valid = valid
        self.visible = attention_mask(valid.shape[1], window=self.cfg.window, device=valid.device)
        self.pending.clear(), self.attn.clear(), self.residual.clear(), self.mlp.clear()

    def hooks(self) -> list[tuple[nn.Module, Any, bool]]:
        hooks: list[tuple[nn.Module, Any, bool]] = []
        for l, block in enumerate(self.model.layers):
            a = block.attn
            hooks += [(a.qkv, lambda x, l=l: self._qkv(l, x), False),
                      (a.capture_weights, lambda x, l=l: self._store(l, "w", x), False),
                      (a.capture_slot, lambda x, l=l: self._store(l, "slot", x), False),
                      (a.capture_values, lambda x, l=l: self._values(l, x), False),
                      (a.proj, lambda x, l=l: self._head_out(l, x), True),
                      (block.capture_resid, lambda x, l=l: self._residual(l, x), False)]
            if block.mlp is not None:
                hooks.append((block.mlp.down, lambda x, l=l: self._mlp(l, x), True))
        return hooks

    def _real(self, x: Tensor) -> Tensor:
        """Drop the learnable sink token's leading row(s): ``(B, S + T, ...)`` -> ``(B, T, ...)``."""
        return x[:, self.cfg.n_sink_tokens:]

    def _qkv(self, layer: int, x: Tensor) -> None:
        assert self.valid is not None and self.visible is not None
        cfg = self.cfg
        B, TS = x.shape[0], x.shape[1]
        q, k, _ = x.detach().view(B, TS, 3, cfg.n_heads, cfg.d_head).permute(2, 0, 3, 1, 4)  # (B, H, S+T, D)
        if cfg.positions == "rope":  # as the layer does, over the sink token too
            q, k = rope(q, cfg.rope_theta), rope(k, cfg.rope_theta)
        S = cfg.n_sink_tokens
        cf, co, n = qk_cosines(q[:, :, S:], k[:, :, S:], self.visible, self.valid)
        self.pending.setdefault(layer, {}).update(cos_first=cf, cos_other=co, n_cos=n)

    def _store(self, layer: int, name: str, x: Tensor) -> None:
        self.pending.setdefault(layer, {})[name] = x.detach()

    def _values(self, layer: int, v: Tensor) -> None:
        """Last capture point of a layer: reduce its weights (and slot) to per-key sums, then drop them."""
        assert self.valid is not None and self.visible is not None
        p = self.pending.pop(layer)
        w, slot = p.pop("w").double(), p.pop("slot", None)  # (B, H, Q, K), (B, H, Q) | None
        qv = self.valid.double()  # (B, Q)
        count = torch.einsum("qk,bq->bk", self.visible.double(), qv)  # (B, K) real queries that see key k
        n_q = qv.sum(-1).clamp_min(1)[:, None]  # (B, 1)
        wn, sn = row_normalised(w, None if slot is None else slot.double())
        stats = {
            "alpha": torch.einsum("bhqk,bq->bhk", w, qv) / count[:, None],
            "alpha_proxy": torch.einsum("bhqk,bq->bhk", wn, qv) / count[:, None],
            "value_norm": v.detach().float().norm(dim=-1),  # (B, H, K)
            **p,
        }
        if slot is not None and sn is not None:
            stats["sink_mass"] = (slot.double() * qv[:, None]).sum(-1) / n_q
            stats["sink_mass_proxy"] = (sn * qv[:, None]).sum(-1) / n_q
        self.attn[layer] = stats
        if self.tick is not None:
            self.tick()

    def _head_out(self, layer: int, x: Tensor) -> None:
        """Input of W_O, ``(B, S + T, H * D)``: mean ||o_t|| per head over real queries."""
        assert self.valid is not None
        o = self._real(x.detach().float())
        B, T = o.shape[:2]
        norm = o.view(B, T, self.cfg.n_heads, self.cfg.d_head).norm(dim=-1)  # (B, T, H)
        qv = self.valid.float()
        self.attn[layer]["out_norm"] = ((norm * qv[:, :, None]).sum(1) / qv.sum(1, keepdim=True).clamp_min(1))

    def _residual(self, layer: int, x: Tensor) -> None:
        assert self.valid is not None
        xf = x.detach().float()  # (B, T, d_model), real tokens only
        self.residual[layer] = xf.norm(dim=-1)
        self.massive.update(layer, xf, self.valid)

    def _mlp(self, layer: int, a: Tensor) -> None:
        assert self.valid is not None
        self.mlp[layer] = mlp_top_neurons(self._real(a), self.valid)


@torch.no_grad()
def profile_tinygpt(model: TinyGPT, batch: TokenBatch | list[list[int]], *, eps: float = 0.3, batch_size: int = 8,
                    pad_token_id: int | None = None, progress: Any = None) -> SinkProfile:
    """`sinkscope.profile.profile_sinks` for a TinyGPT (same arguments; returns a `SinkProfile`).

    Samples are right-padded (with ``pad_token_id``, default 0); under tinygpt's causal masks real queries never
    see padded keys, and padded queries are left out of every mean. ``alpha_proxy`` and (with a sink slot)
    ``sink_mass`` / ``sink_mass_proxy`` are filled; ``gate_*`` stay None (tinygpt has no output gate).

    Raises:
        InputError: a sample longer than ``model.cfg.block_size``.
    """
    if not isinstance(batch, TokenBatch):
        batch = TokenBatch([list(map(int, s)) for s in batch], "ids")
    cfg = model.cfg
    lengths = np.array(batch.lengths)
    if lengths.max() > cfg.block_size:
        raise InputError(f"input of {int(lengths.max())} tokens is longer than the model's context "
                         f"({cfg.block_size}, model.block_size)")
    if max(max(s, default=0) for s in batch.sequences) >= cfg.vocab_size:
        raise InputError(f"token id out of range for model.vocab_size={cfg.vocab_size}")
    device = next(model.parameters()).device
    pad = 0 if pad_token_id is None else int(pad_token_id)
    N, T, L, H = len(lengths), int(lengths.max()), cfg.n_layers, cfg.n_heads
    nan = np.nan
    alpha, alpha_proxy = np.full((N, L, H, T), nan), np.full((N, L, H, T), nan)
    value_norm = np.full((N, L, H, T), nan, np.float32)
    residual = np.full((N, L, T), nan, np.float32)
    cos_first, cos_other, out_norm = (np.full((N, L, H), nan) for _ in range(3))
    slot = has_slot(model)
    sink_mass = np.full((N, L, H), nan) if slot else None
    sink_mass_proxy = np.full((N, L, H), nan) if slot else None
    mlp_idx = np.full((N, L, TOP_NEURONS), -1, np.int64)
    mlp_act, mlp_other = np.full((N, L, TOP_NEURONS), nan), np.full((N, L, TOP_NEURONS), nan)
    unavailable = {} if cfg.mlp else {"mlp_top_*": "model.mlp is false: the blocks have no MLP (-1 / NaN)"}

    n_batches = -(-N // batch_size)
    steps = {"done": 0, "total": n_batches * L}

    def tick() -> None:
        steps["done"] += 1
        if progress is not None:
            progress(steps["done"], steps["total"])

    col = _TinyCollector(model, tick)
    t0 = time.perf_counter()
    order = np.argsort(-lengths, kind="stable")
    with forward_hooks(col.hooks()):
        for start in range(0, N, batch_size):
            rows = order[start:start + batch_size]
            ids, mask = _pad_right([batch.sequences[i] for i in rows], pad)
            ids, mask = ids.to(device), mask.to(device)
            col.start(mask.bool())
            col.massive.rows = rows
            model(ids)
            t = ids.shape[1]
            for l in range(L):
                s = col.attn[l]
                alpha[rows, l, :, :t] = s["alpha"].cpu().numpy()
                alpha_proxy[rows, l, :, :t] = s["alpha_proxy"].cpu().numpy()
                value_norm[rows, l, :, :t] = s["value_norm"].cpu().numpy()
                n_cos = s["n_cos"].clamp_min(1)[:, None]
                cos_first[rows, l] = (s["cos_first"] / n_cos).cpu().numpy()
                cos_other[rows, l] = (s["cos_other"] / n_cos).cpu().numpy()
                out_norm[rows, l] = s["out_norm"].cpu().numpy()
                if sink_mass is not None and sink_mass_proxy is not None:
                    sink_mass[rows, l] = s["sink_mass"].cpu().numpy()
                    sink_mass_proxy[rows, l] = s["sink_mass_proxy"].cpu().numpy()
                residual[rows, l, :t] = col.residual[l].cpu().numpy()
                if l in col.mlp:
                    i_, v_, m_ = col.mlp[l]
                    mlp_idx[rows, l, : i_.shape[1]] = i_.cpu().numpy()
                    mlp_act[rows, l, : v_.shape[1]] = v_.cpu().numpy()
                    mlp_other[rows, l, : m_.shape[1]] = m_.cpu().numpy()
            for i, n in zip(rows, lengths[rows]):  # padded positions are not measurements
                for arr in (alpha, alpha_proxy, value_norm, residual):
                    arr[i, ..., n:] = nan
    elapsed = time.perf_counter() - t0
    return SinkProfile(
        model=tinygpt_info(model), inputs={**batch.to_json(), "versions": versions()},
        attention_layers=list(range(L)), lengths=lengths, alpha=alpha, value_norm=value_norm,
        residual_norm=residual, cos_first=cos_first, cos_other=cos_other, out_norm=out_norm,
        mlp_top_idx=mlp_idx, mlp_top_act=mlp_act, mlp_top_other=mlp_other, massive=col.massive.summary(),
        sink_mass=sink_mass, eps=eps, timing={"forward_s": elapsed}, alpha_proxy=alpha_proxy,
        sink_mass_proxy=sink_mass_proxy, unavailable=unavailable,
    )


def load_trained(run_dir: str | Path) -> tuple[TinyGPT, Any]:
    """The trained model of a ``sinkscope train`` run directory (its ``config.yaml`` and ``checkpoint.pt``).

    Returns:
        ``(model, run_config)``: the TinyGPT in eval mode on the CPU, and the run's resolved `RunConfig`
        (``run_config.data`` rebuilds the task's inputs, see `sinkscope.training.loop.build_task`).
    Raises:
        InputError: no ``config.yaml`` or ``checkpoint.pt`` in ``run_dir``; CheckpointError: a checkpoint that
        is unreadable or from another config.
    """
    from sinkscope.training.checkpoint import CHECKPOINT_NAME, load_checkpoint
    from sinkscope.training.config import load_config

    run = Path(run_dir)
    for name in ("config.yaml", CHECKPOINT_NAME):
        if not (run / name).is_file():
            raise InputError(f"{run} is not a sinkscope train run directory (no {name})")
    cfg = load_config(run / "config.yaml")
    model = TinyGPT(cfg.model)
    model.load_state_dict(load_checkpoint(run / CHECKPOINT_NAME, cfg.state_dict_fingerprint())["model"])
    return model.eval(), cfg


def main(argv: list[str] | None = None) -> int:
    """``python -m sinkscope.models.tinygpt_adapter RUN_DIR... [--samples N]``: profile trained runs on held-out
    task sequences and print Sink_0 from the weights used and from the proxy, Sink_* and the per-layer ratios."""
    import argparse

    from sinkscope.training.loop import build_task

    ap = argparse.ArgumentParser(prog="python -m sinkscope.models.tinygpt_adapter", description=main.__doc__)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--samples", type=int, default=32, help="held-out sequences per run (seed 1234, step 0)")
    args = ap.parse_args(argv)
    for run in args.runs:
        model, cfg = load_trained(run)
        batch = build_task(cfg.data).batch(1234, 0, args.samples, cfg.data.seq_len)
        s = profile_tinygpt(model, batch.idx.tolist()).summary()
        r3 = lambda xs: [round(x, 3) for x in xs]  # noqa: E731
        slot = "" if "sink_ratio_slot" not in s else (
            f" Sink_* {s['sink_ratio_slot']:.3f} (proxy {s['sink_ratio_slot_proxy']:.3f}),"
            f" slot mass by layer {r3(s['learned_sink_mass_by_layer'])};")
        print(f"{run}: {cfg.model.attention}, attn_bias {cfg.model.attn_bias}: Sink_0 {s['sink_ratio']:.3f}"
              f" (proxy {s['sink_ratio_proxy']:.3f}); alpha_0 by layer {r3(s['attention_on_first_by_layer'])}"
              f" (proxy {r3(s['attention_on_first_by_layer_proxy'])});{slot} value ratio"
              f" {r3(s['value_ratio_first_by_layer'])}, residual ratio {r3(s['residual_ratio_first_by_layer'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
