"""Where a trained tinygpt's sink sits: ``Sink_k`` and ``alpha_k`` at every key position ``k``, on held-out rows
and on Gu et al.'s first-token probes (2410.10781 §5, Table 10), over a run's checkpoints.

Gu et al. change the *training* data: a uniformly random token at position 0, or one fixed token at position
``j`` (this lab's ``data.random_token_pos`` / ``data.fixed_token_pos`` switches, `sinkscope.tasks.text_lm`).
This module measures a trained model on held-out rows (`probe_rows`):

- ``text``: the rows as they are (chunks that start mid-document, no BOS);
- ``random0``: each row's token at position 0 replaced by a token drawn uniformly from the vocabulary without
  the BOS id (the training switch's distribution);
- ``fixed``: each row's token at position ``j`` replaced by the fixed token.

On a model trained with a switch, the probe of that switch is the model's own input distribution (Gu et al.'s
measurement); on a model trained without it, the probe is an *evaluation-time* change (ours, not the paper's).
`position_profile` gives, per key position, ``Sink_k^eps`` (share of samples x layers x heads with
``alpha_k > eps``, `sinkscope.profile.SinkProfile.sink_ratio_by_position`) and the strongest head's mean
``alpha_k``. `probe_checkpoints` does it for every checkpoint snapshot of a run (a folder of copies of its
``checkpoint.pt``) and returns a `PositionProbes` that saves itself as ``positions.json``.

CLI: ``sinkscope train positions OUT RUN [RUN ...] --fixed-pos 8 --fixed-token 0 [--figure PNG]``;
`positions_figure` draws a saved ``positions.json`` (`sinkscope.viz.training.plot_sink_positions`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from sinkscope.errors import InputError
from sinkscope.io import ensure_output_dir, write_json_atomic
from sinkscope.models.tinygpt import TinyGPT
from sinkscope.profile import profile_sinks
from sinkscope.training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from sinkscope.training.config import RunConfig, load_config
from sinkscope.viz.training import plot_sink_positions

#: the probes of `probe_rows`
PROBES = ("text", "random0", "fixed")


def probe_rows(rows: Tensor, probe: str, *, vocab_size: int, bos_id: int, fixed_pos: int = 8,
               fixed_token: int = 0, seed: int = 0) -> Tensor:
    """A copy of ``rows (N, T)`` with one of Gu et al.'s first-token changes (module docstring).

    ``random0`` draws, per row, from the ``vocab_size - 1`` ids other than ``bos_id`` (seeded by ``seed``);
    ``fixed`` writes ``fixed_token`` at column ``fixed_pos``; ``text`` returns the rows unchanged.
    """
    if probe not in PROBES:
        raise InputError(f"unknown probe {probe!r} (choose from {', '.join(PROBES)})")
    out = rows.clone()
    if probe == "random0":
        g = torch.Generator().manual_seed(seed)
        tok = torch.randint(0, vocab_size - 1, (len(out),), generator=g)
        out[:, 0] = tok + (tok >= bos_id).long()
    elif probe == "fixed":
        if not 0 <= fixed_pos < out.shape[1]:
            raise InputError(f"fixed position {fixed_pos} is outside rows of length {out.shape[1]}")
        out[:, fixed_pos] = fixed_token
    return out


@dataclass
class PositionProfile:
    """Where one model's attention goes on one set of rows.

    Attributes:
        sink: (T,) ``Sink_k^eps`` per key position ``k`` (share of samples x layers x heads with alpha_k > eps).
        alpha_max_head: (T,) the largest, over layers and heads, of ``alpha_k`` averaged over the rows.
    """

    sink: np.ndarray
    alpha_max_head: np.ndarray

    def to_json(self) -> dict[str, list[float]]:
        r = lambda a: [round(float(v), 4) for v in a]  # noqa: E731
        return {"sink": r(self.sink), "alpha_max_head": r(self.alpha_max_head)}


@torch.no_grad()
def position_profile(model: TinyGPT, rows: Tensor, eps: float = 0.3) -> PositionProfile:
    """`PositionProfile` of ``model`` on ``rows (N, T)`` token ids (eager attention weights, as used)."""
    prof = profile_sinks(model, rows.tolist(), eps=eps, batch_size=max(len(rows), 1))
    alpha = prof.alpha_of()  # (N, L, H, T)
    per_head = np.nanmean(alpha, axis=0)  # (L, H, T)
    return PositionProfile(sink=prof.sink_ratio_by_position(eps), alpha_max_head=per_head.max(axis=(0, 1)))


def heldout_rows(cfg: RunConfig, n_rows: int, seed: int = 0) -> tuple[Tensor, int, int]:
    """``n_rows`` held-out text rows of a run's corpus (no switches applied; BOS only if the run had one), with
    the vocabulary size and BOS id: ``(rows (n_rows, seq_len), vocab_size, bos_id)``."""
    from sinkscope.training.loop import build_task

    data = dataclasses.replace(cfg.data, fixed_token_pos=None, random_token_pos=None)
    if data.task != "text":
        raise InputError(f"position probes need a text run (data.task=text), got {data.task}")
    task = build_task(data)
    n_total = n_rows + -(-n_rows // 3)  # eval_batch keeps 3/4 text rows
    batch = task.eval_batch(seed, n_total, data.seq_len)
    text = batch.idx[batch.classes["text"][:, 0]][:n_rows]
    return text, task.vocab_size, task.bos_id


@dataclass
class PositionProbes:
    """Per run, per checkpoint step, per probe: a `PositionProfile` (as JSON). Saves itself as ``positions.json``."""

    settings: dict[str, Any]
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # run -> [{"step", probe: profile}]

    def save(self, directory: str | Path) -> Path:
        out = ensure_output_dir(directory)
        path = Path(out) / "positions.json"
        write_json_atomic(path, {"settings": self.settings, "runs": self.runs})
        return path


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """A run's checkpoint snapshots (``RUN/snapshots/*.pt``, copies of ``checkpoint.pt``) and its last checkpoint."""
    snaps = sorted((run_dir / "snapshots").glob("*.pt")) if (run_dir / "snapshots").is_dir() else []
    last = run_dir / CHECKPOINT_NAME
    return snaps + ([last] if last.is_file() else [])


def probe_checkpoints(run_dirs: Sequence[str | Path], *, n_rows: int = 96, fixed_pos: int = 8, fixed_token: int = 0,
                      every: int = 1000, eps: float = 0.3, seed: int = 0) -> PositionProbes:
    """Every probe on each run's checkpoints at steps that are multiples of ``every`` (and its last step), on the
    same held-out rows (drawn from the first run's corpus; the runs must share corpus and tokenizer)."""
    runs = [Path(r) for r in run_dirs]
    cfgs = [load_config(r / "config.yaml") for r in runs]
    rows, vocab, bos = heldout_rows(cfgs[0], n_rows, seed)
    probes = {p: probe_rows(rows, p, vocab_size=vocab, bos_id=bos, fixed_pos=fixed_pos, fixed_token=fixed_token,
                            seed=seed) for p in PROBES}
    result = PositionProbes(settings={"rows": len(rows), "seq_len": rows.shape[1], "eps": eps, "fixed_pos": fixed_pos,
                                      "fixed_token": fixed_token, "every": every, "seed": seed, "probes": list(PROBES)})
    for run, cfg in zip(runs, cfgs, strict=True):
        model = TinyGPT(dataclasses.replace(cfg.model, vocab_size=vocab))
        states: dict[int, dict] = {}
        for path in checkpoint_paths(run):
            state = load_checkpoint(path, cfg.state_dict_fingerprint())
            states[int(state["step"])] = state["model"]
        if not states:
            raise InputError(f"{run} has no checkpoint")
        last = max(states)
        entries = []
        for step in sorted(s for s in states if s % every == 0 or s == last):
            model.load_state_dict(states[step])
            model.eval()
            entries.append({"step": step, **{p: position_profile(model, x, eps).to_json() for p, x in probes.items()}})
        result.runs[run.name] = entries
    return result


def own_probe(cfg: RunConfig) -> str:
    """``random0`` / ``fixed`` for a run trained with that switch, else ``text``."""
    if cfg.data.random_token_pos == 0:
        return "random0"
    return "fixed" if cfg.data.fixed_token_pos is not None else "text"


def positions_figure(positions: dict[str, Any], own: dict[str, str], title: str = "") -> Figure:
    """The figure of a ``positions.json`` (`PositionProbes`): the strongest head's alpha_0 (and alpha_j for a run
    trained with a fixed token) over training on each run's own inputs (``own``: run -> probe); alpha_k and
    Sink_k by key position at each run's last step, on its own inputs, and for runs trained on plain text also
    under the two evaluation-time probes."""
    st = positions["settings"]
    j = int(st["fixed_pos"])
    over: dict[str, tuple[list[float], list[float]]] = {}
    alpha: dict[str, list[float]] = {}
    sink: dict[str, list[float]] = {}
    for run, entries in positions["runs"].items():
        probe = own[run]
        steps = [e["step"] for e in entries]
        over[f"{run}: alpha_0"] = (steps, [e[probe]["alpha_max_head"][0] for e in entries])
        if probe == "fixed":
            over[f"{run}: alpha_{j}"] = (steps, [e[probe]["alpha_max_head"][j] for e in entries])
        last = entries[-1]
        for p in (PROBES if probe == "text" else (probe,)):
            label = f"{run} @{last['step']}" + ("" if p == probe else f", eval-time {p}")
            alpha[label], sink[label] = last[p]["alpha_max_head"], last[p]["sink"]
    return plot_sink_positions(over, alpha, sink, eps=float(st["eps"]), marks=(0, j), title=title)
