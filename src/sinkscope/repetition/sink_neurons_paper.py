"""The paper's patch (Yona et al. 2503.08908, `repeat patch --method paper`, alias ``yona``): the sink layer, its
sink neurons, and their clamp, by the paper's rules.

* **Sink layer** (`find_sink_layer`): run one-token inputs, take the norm of each layer's MLP output at position 0,
  ``m_l`` (mean over the probe tokens); the sink layer is the first layer ``l`` in the first half of the network
  with ``m_l > mean(m) + 2 std(m)``, mean and std over the first half's layers.
* **Sink neurons** (`find_sink_neurons`): in that layer score neuron ``j`` by ``|a_j(first token)| *
  ||W_down[:, j]||`` (``a``: the input of the down projection, mean over the probe tokens), take the top ``k``,
  and keep those whose zero-ablation at the first token removes a real share of the first token's residual-norm
  peak (``min_drop``; the top-scored neuron is kept if none does).
* **Patch** (`sink_neurons_patch`): those neurons set to their ordinary value (median over non-first positions of
  ordinary text) at every position except each row's first real token: no gate, no threshold (a `NeuronRule` with
  threshold 0 fires wherever the activation is not exactly 0).

This is the paper's patch; sinkscope's own patch (`sinkscope.repetition.direction`) acts only inside repetitions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sinkscope.capture import forward_hooks
from sinkscope.devices import model_device
from sinkscope.errors import InputError
from sinkscope.interventions.patch import NeuronRule, SinkPatch
from sinkscope.models.adapters import get_adapter
from sinkscope.repetition.activations import neuron_stats
from sinkscope.repetition.words import run_token_id


@dataclass
class SinkLayer:
    """`find_sink_layer`'s result: the layer (None when no layer passes), ``m_l`` for every layer, and the
    threshold ``mean + 2 std`` over the first ``half`` layers."""

    layer: int | None
    mlp_norm: list[float]
    threshold: float
    half: int


def probe_tokens(tokenizer: Any, words: Sequence[str]) -> list[int]:
    """Run-token ids of ``words`` (the one-token probe inputs)."""
    return [run_token_id(tokenizer, w) for w in words]


@torch.no_grad()
def _first_position(model: nn.Module, tokens: Sequence[int], modules: Sequence[nn.Module], *, inputs: bool
                    ) -> list[Tensor]:
    """Each module's output (or input) at position 0 of one-token inputs, one row per token: [(P, D)]."""
    device = model_device(model)
    got: dict[int, Tensor] = {}
    hooks = [(m, (lambda x, i=i: got.__setitem__(i, x.detach().float()[:, 0].cpu())), inputs)
             for i, m in enumerate(modules)]
    ids = torch.tensor([[t] for t in tokens], device=device)
    with forward_hooks(hooks):
        model(input_ids=ids, use_cache=False)
    return [got[i] for i in range(len(modules))]


@torch.no_grad()
def find_sink_layer(model: nn.Module, tokens: Sequence[int]) -> SinkLayer:
    """Yona et al.'s sink-layer rule on one-token inputs ``tokens`` (see the module docstring)."""
    if not tokens:
        raise InputError("need at least one probe token")
    a = get_adapter(model)
    mods = [a.mlp_down_module(l) for l in range(a.n_layers)]
    if any(m is None for m in mods):
        raise InputError("the sink-layer rule needs a dense MLP in every layer")
    outs = _first_position(model, tokens, mods, inputs=False)  # (P, d) per layer
    m = torch.tensor([float(o.norm(dim=-1).mean()) for o in outs])
    half = max(2, a.n_layers // 2)
    first = m[:half]
    thr = float(first.mean() + 2 * first.std())
    layer = next((l for l in range(half) if float(m[l]) > thr), None)
    return SinkLayer(layer, m.tolist(), thr, half)


@torch.no_grad()
def _residual_peak(model: nn.Module, ids: Tensor, ablate: tuple[int, list[int]] | None = None) -> float:
    """Max over layers of the first token's residual norm (mean over rows), optionally with neurons zeroed at
    position 0 of ``ablate[0]``'s down projection input."""
    a = get_adapter(model)
    norms: list[Tensor] = []
    hooks: list[Any] = [(m, (lambda x: norms.append(x.detach().float()[:, 0].norm(dim=-1).mean())), False)
                        for m in a.layer_modules]
    handle = None
    if ablate is not None:
        layer, idx = ablate

        def zero(mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0].clone()
            x[:, 0, idx] = 0.0
            return (x, *args[1:])

        handle = a.mlp_down_module(layer).register_forward_pre_hook(zero)
    try:
        with forward_hooks(hooks):
            model(input_ids=ids, use_cache=False)
    finally:
        if handle is not None:
            handle.remove()
    return float(torch.stack(norms).max())


@dataclass
class SinkNeuron:
    """One candidate: its index, score ``|a_j| * ||W_down[:, j]||``, mean ``|a_j|`` at the first token, and the
    share of the first token's residual-norm peak its zero-ablation removes."""

    index: int
    score: float
    first_activation: float
    peak_drop: float
    kept: bool


@torch.no_grad()
def find_sink_neurons(model: nn.Module, layer: int, tokens: Sequence[int], *, k: int = 8, min_drop: float = 0.1
                      ) -> list[SinkNeuron]:
    """The top ``k`` first-token neurons of ``layer`` on one-token inputs, with their ablation effect."""
    a = get_adapter(model)
    down = a.mlp_down_module(layer)
    if down is None:
        raise InputError(f"layer {layer} has no dense MLP")
    (act,) = _first_position(model, tokens, [down], inputs=True)  # (P, F)
    first = act.abs().mean(0)
    w = down.weight.detach().float().norm(dim=0).cpu()  # (F,): ||W_down[:, j]||
    score = first * w
    top = score.topk(min(k, score.numel())).indices.tolist()
    device = model_device(model)
    ids = torch.tensor([[t] for t in tokens], device=device)
    peak = _residual_peak(model, ids)
    out = []
    for j in top:
        drop = 1.0 - _residual_peak(model, ids, (layer, [j])) / peak
        out.append(SinkNeuron(j, float(score[j]), float(first[j]), drop, drop >= min_drop))
    if not any(n.kept for n in out):
        out[0].kept = True
    return out


def sink_neurons_patch(model: nn.Module, tokenizer: Any, calibration: Sequence[Sequence[int]],
                       probe_words: Sequence[str], *, base_model: str, k: int = 8, min_drop: float = 0.1,
                       batch_size: int = 8) -> tuple[SinkPatch, dict[str, Any]]:
    """The published patch: the sink layer's kept sink neurons set to their ordinary median (on ``calibration``
    text) at every position but the first. Returns the patch and a report (layer rule, candidates)."""
    tokens = probe_tokens(tokenizer, probe_words)
    sl = find_sink_layer(model, tokens)
    if sl.layer is None:
        raise InputError("no layer passes the sink-layer rule (MLP output norm > mean + 2 std in the first half)")
    neurons = find_sink_neurons(model, sl.layer, tokens, k=k, min_drop=min_drop)
    kept = sorted(n.index for n in neurons if n.kept)
    stats = neuron_stats(model, calibration, batch_size=batch_size)
    rule = NeuronRule(sl.layer, kept, [0.0] * len(kept), [float(stats.other_median[sl.layer][j]) for j in kept])
    report = {"sink_layer": asdict(sl), "neurons": [asdict(n) for n in neurons], "probe_words": list(probe_words),
              "min_drop": min_drop, "k": k}
    meta = {"method": "paper", "sink_layer": sl.layer, "neurons": kept, "probe_words": list(probe_words)}
    return SinkPatch([rule], base_model, True, meta), report
