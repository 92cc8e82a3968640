"""Calibrate a per-head KV policy from attention masses: rank the kv heads, pick how many keep the full cache.

1. Profile the *ranking* pieces of the calibration text (`sinkscope.kv.calibration_data`) at the target length:
   every (layer, kv head)'s attention mass on the sinks, the window and the distant rest (`sinkscope.kv.mass`).
2. Rank the kv heads by **distant mass**: the share of the head's attention that a streaming head would drop.
   Dropping keys of softmax weight ``m`` changes that head's output by at most ``2 m max|v|`` (the kept weights are
   renormalised by ``1 / (1 - m)``), so the distant mass bounds each head's error directly; the sink and window
   masses are kept in the policy for inspection.
3. Choose the number of full heads: by ``budget`` (fraction of the dense cache's bytes at the target length,
   `sinkscope.kv.policy.n_full_for_budget`), or by ``max_kl``: the smallest budget (fewest top-ranked full heads)
   whose mean next-token KL(dense || policy) on the *held-out* pieces stays at or below ``max_kl``, measured with
   the policy's exact dense per-head-masked forward (`sinkscope.kv.attention.policy_masked`), found by bisection
   over the number of full heads (the KL falls as full heads are added).

The KL is averaged over the positions that can differ (``t > n_sink + window``; earlier queries lose nothing), in
nats per token.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sinkscope.errors import InputError
from sinkscope.io import ensure_output_dir, write_json_atomic
from sinkscope.kv.attention import check_supported, policy_masked
from sinkscope.kv.calibration_data import DEV_PROSE_RULE, calibration_sets
from sinkscope.kv.mass import first_counted_query, head_masses
from sinkscope.kv.policy import KVPolicy, model_card, n_full_for_budget
from sinkscope.progress import ProgressCallback

DEFAULT_LENGTH = 1024
DEFAULT_SINKS = 4
DEFAULT_BUDGET = 0.25
#: the ranking column (`sinkscope.kv.policy.SCORE_COLUMNS`); chosen on DEV data (bench/kv_ranking_dev.py)
DEFAULT_CRITERION = "drop_error"
CALIBRATION_FILE = "calibration.json"


@dataclass
class CalibrationResult:
    """A calibrated policy and how it was found.

    Attributes:
        policy: the chosen `KVPolicy`.
        curve: the budgets whose KL was measured: ``{"n_full", "budget", "kl"}`` rows, ascending ``n_full``.
        seconds: wall time of the calibration.
        pieces: per set (ranking / held_out), the kinds of its pieces.
        cpu_seconds: CPU time of this process during the calibration (all threads).
        machine: torch threads, CPU count and load average at the end (timings on a shared machine).
    """

    policy: KVPolicy
    curve: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    pieces: dict[str, list[str]] = field(default_factory=dict)
    cpu_seconds: float = 0.0
    machine: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: str | Path) -> Path:
        """``policy.json`` + the DuoAttention pattern (`KVPolicy.save`) and ``calibration.json`` (curve, timing)."""
        d = ensure_output_dir(directory)
        self.policy.save(d)
        write_json_atomic(d / CALIBRATION_FILE, {"curve": self.curve, "seconds": self.seconds,
                                                 "cpu_seconds": self.cpu_seconds, "machine": self.machine,
                                                 "pieces": self.pieces, "dev_rule": DEV_PROSE_RULE})
        return d


_CRITERIA = {"distant": "distant mass (the attention a streaming head drops)",
             "drop_error": "drop error (norm of the change of the layer's attention output, after W_O, when the "
                           "head alone keeps sinks + window)"}


class HeldOutKL:
    """Mean next-token KL(dense || policy) on held-out pieces, dense log-probabilities computed once."""

    def __init__(self, model: nn.Module, pieces: list[torch.Tensor], t0: int) -> None:
        from sinkscope.devices import model_device

        self.model, self.t0, self.device = model, t0, model_device(model)
        self.pieces = [p.to(self.device) for p in pieces]
        with torch.no_grad():
            self.dense = [self._logp(p) for p in self.pieces]

    def _logp(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=ids[None], use_cache=False).logits[0, self.t0:]
        return torch.log_softmax(logits.float(), dim=-1)

    @torch.no_grad()
    def __call__(self, policy: KVPolicy) -> float:
        total, n = 0.0, 0
        with policy_masked(self.model, policy):
            for ids, dense in zip(self.pieces, self.dense):
                lp = self._logp(ids)
                total += float((dense.exp() * (dense - lp)).sum())
                n += dense.shape[0]
        return total / max(1, n)


def default_window(budget: float | None, n_sink: int, length: int) -> int:
    """The window when none is given: half of the budget's bytes go to the streaming heads' sinks + window, so
    ``n_sink + window = budget / 2 * length`` (budget 0.25 when calibrating by ``max_kl``). Chosen on DEV data
    (bench/results/kv_ranking_dev.json, kv_window_dev.jsonl): a larger window lowers the KL on prose and code, a
    smaller one leaves more of the budget to full-cache (retrieval) heads.

    >>> default_window(0.25, 4, 1024), default_window(0.125, 4, 1024), default_window(0.5, 4, 1024)
    (124, 60, 252)
    """
    return max(1, int(round((budget if budget is not None else DEFAULT_BUDGET) / 2 * length)) - n_sink)


def calibrate(model: nn.Module, tokenizer: Any, *, texts: list[str] | None = None,
              target_length: int = DEFAULT_LENGTH, n_sink: int = DEFAULT_SINKS, window: int | None = None,
              budget: float | None = None, max_kl: float | None = None, measure_kl: bool = True,
              criterion: str = DEFAULT_CRITERION, progress: ProgressCallback | None = None) -> CalibrationResult:
    """A per-head KV policy for ``model`` from calibration text (see the module docstring).

    Args:
        model, tokenizer: a Hugging Face causal LM with full causal attention in every layer, and its tokenizer.
        texts: the user's own calibration text(s); None: the shipped DEV mix of prose, code and retrieval prompts.
        target_length: tokens per calibration piece; the budget refers to this length.
        n_sink, window: what each streaming head keeps (``window=None``: `default_window`).
        budget: fraction of the dense cache's bytes at ``target_length`` (default 0.25 when ``max_kl`` is None).
        max_kl: instead of a budget, the largest acceptable KL (nats/token) on the held-out pieces.
        measure_kl: measure the chosen policy's KL (always done with ``max_kl``).
        criterion: the measurement that ranks the heads: ``"drop_error"`` or ``"distant"`` (module docstring).
        progress: called with (steps done, total, what).

    Raises:
        InputError: both or invalid ``budget`` / ``max_kl``, a budget below the streaming floor, too little text.
    """
    if budget is not None and max_kl is not None:
        raise InputError("give either budget or max_kl, not both", param="budget")
    if max_kl is not None and not max_kl > 0:
        raise InputError(f"max_kl must be positive (nats/token), got {max_kl}", param="max_kl")
    if budget is None and max_kl is None:
        budget = DEFAULT_BUDGET
    if window is None:
        window = default_window(budget, n_sink, target_length)
    if n_sink < 0 or window < 1:
        raise InputError(f"need n_sink >= 0 and window >= 1, got n_sink={n_sink}, window={window}", param="window")
    if target_length <= first_counted_query(n_sink, window):
        raise InputError(f"length {target_length} must exceed n_sink + window + 1 = "
                         f"{first_counted_query(n_sink, window)}", param="length")
    card = model_card(model)
    n_heads = card["n_layers"] * card["n_kv_heads"]
    if budget is not None:
        n_full_for_budget(budget, n_heads, n_sink, window, target_length)  # the floor check, before any work
    check_supported(model)
    started, cpu_started = time.perf_counter(), time.process_time()
    sets = calibration_sets(tokenizer, target_length, texts=texts)
    steps = len(sets.ranking) + (len(sets.held_out) if (measure_kl or max_kl is not None) else 0)
    done = 0

    def tick(_: int, __: int | None, what: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, steps, what)

    scores = head_masses(model, sets.ranking, n_sink=n_sink, window=window, progress=tick)
    sha = hashlib.sha256(sets.text.encode("utf-8")).hexdigest()
    common = dict(model=card, calibration_sha256=sha)

    def policy_for(n_full: int, kl: float | None) -> KVPolicy:
        b = (n_full * target_length + (n_heads - n_full) * min(target_length, n_sink + window)) / (
            n_heads * target_length)
        return KVPolicy.from_scores(scores, b, n_sink, window, target_length, measured_kl=kl, criterion=criterion,
                                    info={"requested_budget": budget, "max_kl": max_kl}, **common)

    curve: list[dict[str, float]] = []
    if budget is not None and not measure_kl:
        policy = KVPolicy.from_scores(scores, budget, n_sink, window, target_length, criterion=criterion,
                                      info={"requested_budget": budget}, **common)
    else:
        kl = HeldOutKL(model, sets.held_out, first_counted_query(n_sink, window))
        for _ in sets.held_out:
            tick(0, None, "held-out pieces")
        measured: dict[int, float] = {}

        def kl_of(n_full: int) -> float:
            if n_full not in measured:
                measured[n_full] = kl(policy_for(n_full, None))
                curve.append({"n_full": n_full, "budget": policy_for(n_full, None).budget, "kl": measured[n_full]})
            return measured[n_full]

        if budget is not None:
            n = n_full_for_budget(budget, n_heads, n_sink, window, target_length)
            policy = KVPolicy.from_scores(scores, budget, n_sink, window, target_length, measured_kl=kl_of(n),
                                          criterion=criterion, info={"requested_budget": budget}, **common)
        else:
            assert max_kl is not None  # budget is None only when max_kl was given (else it defaults above)
            lo, hi = 0, n_heads  # kl_of(n_heads) = 0 (dense): the answer lies in [lo, hi]
            if kl_of(0) <= max_kl:
                hi = 0
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if kl_of(mid) <= max_kl:
                    hi = mid
                else:
                    lo = mid
            policy = policy_for(hi, kl_of(hi) if hi < n_heads else 0.0)
        curve.sort(key=lambda r: r["n_full"])
    info = {**policy.info, "criterion": _CRITERIA.get(criterion, criterion),
            "ranking_pieces": len(sets.ranking), "held_out_pieces": len(sets.held_out),
            "kl_positions": f"t > n_sink + window = {n_sink + window}", "dev_rule": DEV_PROSE_RULE if texts is None
            else "user text: every 4th piece held out"}
    policy = policy.with_fields(info=info)
    machine = {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
               "load_average": list(os.getloadavg())}
    return CalibrationResult(policy, curve, time.perf_counter() - started,
                             {"ranking": sets.ranking_kinds, "held_out": sets.held_out_kinds},
                             time.process_time() - cpu_started, machine)
