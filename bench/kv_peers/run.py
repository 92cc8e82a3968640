"""The peers' benchmark: kvpress's presses beside sinkscope's dense and policy rows, in one process, on the same
EVAL suite and model, at the same budgets; results in the schema of `sinkscope kv eval`.

Run it in the benchmark's own environment (kvpress 0.5.5 pins transformers < 5.3; sinkscope's own dependencies
never install kvpress):

    bash bench/kv_peers/setup.sh                       # once: bench/kv_peers/.venv (log: bench/kv_peers/setup.log)
    OMP_NUM_THREADS=1 bench/kv_peers/.venv/bin/python bench/kv_peers/run.py --policy POLICY_DIR \\
        --out docs/results/kv/peers --budgets 0.25 --lengths 1024

Presses (compression_ratio = 1 - budget, the fraction of the context's cache removed after prefill):

* ``streaming_llm``: ``KeyRerotationPress(StreamingLLMPress(n_sink=4))`` (RoPE-correct StreamingLLM: kept keys
  re-rotated to consecutive slots; later tokens continue from the compressed length, as kvpress's pipeline does);
* ``snapkv``: ``SnapKVPress`` (scores from the context's last 64 queries);
* ``expected_attention``: ``ExpectedAttentionPress``;
* ``duo_on_the_fly``: ``DuoAttentionPress(on_the_fly_scoring=True)``: kvpress's experimental estimate of the head
  scores from mean queries and keys of 50 text samples. kvpress draws the samples from the BookSum dataset on the
  hub and loads the tokenizer from the hub by name; neither is reachable here, so this runner hands it 50 samples
  of the DEV half of the shipped WikiText-2 (the calibration half, never evaluated) and the model's own tokenizer;
  everything else is kvpress's code. Its streaming heads keep sinks + window sized like the policy's (kvpress's
  default 128 + 256 cannot reach a 25% budget at 1024 tokens), and ``head_compression_ratio`` is the share of
  streaming heads that gives the budget. The press masks a full-size cache (keys replaced by "fake keys" at
  attention time), so its stored bytes do not fall: the rows record the bytes really stored.

The context the presses compress is everything before the question (retrieval), before the scored tail (streams),
or the whole prompt (agreement); the question, the answer and the tail are fed uncompressed, as in kvpress's
pipeline. Sinkscope's rows go through the same harness (`sinkscope.kv.evaluate`), so every number is comparable.
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

PRESSES = ("streaming_llm", "snapkv", "expected_attention", "duo_on_the_fly")


def _dev_samples(n: int = 50, chars: int = 1000) -> list[str]:
    """``n`` pieces of ``chars`` characters spread over the DEV half of the shipped WikiText-2."""
    from sinkscope.corpora import corpus_path
    from sinkscope.kv.suite import split_articles

    dev = "".join(split_articles(corpus_path().read_text(encoding="utf-8"))[0])
    step = (len(dev) - chars) // n
    return [dev[i * step:i * step + chars] for i in range(n)]


def _offline_duo_scores(model: Any, tokenizer: Any) -> Any:
    """kvpress's ``duo_attention_on_the_fly(model)`` with its two hub look-ups answered locally (see the module
    docstring); returns its (layers, kv heads) score array."""
    import kvpress.presses.duo_attention_press as duo
    import pandas as pd

    texts = _dev_samples()
    duo.load_dataset = lambda *a, **k: types.SimpleNamespace(to_pandas=lambda: pd.DataFrame({"chapter": texts}))
    duo.AutoTokenizer = types.SimpleNamespace(from_pretrained=lambda *a, **k: tokenizer)
    return duo.duo_attention_on_the_fly(model)


def press_methods(model: Any, tokenizer: Any, names: list[str], budgets: list[float], n_sink: int, window: int,
                  length: int) -> list[Any]:
    """One `sinkscope.kv.evaluate.Method` per (press, budget): a DynamicCache compressed by the press at the end
    of the context's prefill (one forward, as kvpress's pipeline does)."""
    from kvpress import DuoAttentionPress, ExpectedAttentionPress, KeyRerotationPress, SnapKVPress, StreamingLLMPress
    from transformers import DynamicCache

    from sinkscope.kv.evaluate import Method

    duo_scores = None

    @dataclass
    class LocalDuo(DuoAttentionPress):
        """DuoAttentionPress with the on-the-fly scores and the policy's sinks + window for streaming heads."""

        sink: int = 4
        recent: int = 60

        def post_init_from_model(self, model: Any) -> None:
            super().post_init_from_model(model)
            self.sink_size, self.recent_size = self.sink, self.recent

    def make(name: str, budget: float, check: bool = False) -> tuple[Any, dict[str, Any]]:
        nonlocal duo_scores
        ratio = 1.0 - budget
        if name == "streaming_llm":
            return KeyRerotationPress(press=StreamingLLMPress(compression_ratio=ratio, n_sink=4)), {}
        if name == "snapkv":
            return SnapKVPress(compression_ratio=ratio), {}
        if name == "expected_attention":
            return ExpectedAttentionPress(compression_ratio=ratio), {}
        if name == "duo_on_the_fly":
            if duo_scores is None and not check:
                t0 = time.perf_counter()
                duo_scores = _offline_duo_scores(model, tokenizer)
                print(f"duo on-the-fly scores: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            floor = (n_sink + window) / length
            share = ratio / (1.0 - floor)
            note = (f"masks a full-size cache (stored bytes do not fall); nominal budget {budget:g}: "
                    f"{share:.3f} of the kv heads streaming with {n_sink} sinks + {window} window")
            if share > 1:
                note = f"budget {budget:g} unreachable with {n_sink}+{window} per streaming head; all heads streaming"
                share = 1.0
            return LocalDuo(head_compression_ratio=share, on_the_fly_scoring=True, sink=n_sink, recent=window), {
                "note": note, "head_compression_ratio": share}
        raise ValueError(name)

    methods = []
    for name in names:
        for b in budgets:
            _, info = make(name, b, check=True)  # checks the settings before any cell (duo's scores: at first use)

            def prefill(model: Any, ids: torch.Tensor, cache: Any, name: str = name, b: float = b) -> torch.Tensor:
                press, _ = make(name, b)
                with press(model):
                    out = model.model(input_ids=ids, past_key_values=cache, use_cache=True)
                return model.lm_head(out.last_hidden_state[:, -1])[0].float()

            next_position = (lambda cache, c: int(cache.get_seq_length())) if name == "streaming_llm" else None
            methods.append(Method(f"kvpress:{name}", b, None, lambda m, n: DynamicCache(), prefill, next_position,
                                  info={"compression_ratio": 1.0 - b, **info}))
    return methods


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="a calibrated policy directory (sinkscope kv calibrate)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--budgets", default="0.25")
    p.add_argument("--lengths", default="1024")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--tasks", default="passkey,multikey,prose,code,agree")
    p.add_argument("--presses", default=",".join(PRESSES))
    p.add_argument("--ours", default="dense,policy", help="sinkscope methods run in the same process")
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--score-tokens", type=int, default=64)
    p.add_argument("--agree", type=int, default=2)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)

    import kvpress  # noqa: F401  (patches the attention functions for head-wise masks)
    import transformers

    from sinkscope import load_model
    from sinkscope.io import OutputLock, check_output_dir
    from sinkscope.kv.evaluate import EvalOptions, MethodContext, build_methods, evaluate, threads_note
    from sinkscope.kv.policy import KVPolicy
    from sinkscope.kv.suite import SuiteSpec, build_suite
    from sinkscope.progress import ProgressReporter
    from sinkscope.viz.kv import plot_quality_vs_bytes

    torch.set_num_threads(a.threads)
    budgets = [float(x) for x in a.budgets.split(",")]
    lengths = tuple(int(x) for x in a.lengths.split(","))
    presses = [x for x in a.presses.split(",") if x]
    bad = [x for x in presses if x not in PRESSES]
    if bad:
        p.error(f"unknown presses {bad}; choose from {PRESSES}")
    spec = SuiteSpec(lengths=lengths, depths=tuple(float(x) for x in a.depths.split(",")),
                     tasks=tuple(a.tasks.split(",")), n_streams=a.streams, n_agree=a.agree,
                     score_tokens=a.score_tokens)
    policy = KVPolicy.load(a.policy)
    out = check_output_dir(a.out)
    with OutputLock(out):
        model, tokenizer = load_model(a.model)
        ours = build_methods(model, [x for x in a.ours.split(",") if x],
                             MethodContext(policy=policy, budgets=tuple(budgets), seeds=(0,), n_sink=policy.n_sink))
        # kvpress's rows before our head-wise ones: `headwise_cache` switches the model's attention function
        methods = ([m for m in ours if m.policy_for is None]
                   + press_methods(model, tokenizer, presses, budgets, policy.n_sink, policy.window, max(lengths))
                   + [m for m in ours if m.policy_for is not None])
        suite = build_suite(tokenizer, spec)
        settings = {"model": a.model, "dtype": "float32", "device": "cpu", "n_sink_uniform": policy.n_sink,
                    "policy": policy.to_json(), "bench": "kv_peers"}
        with ProgressReporter("kv peers cells", unit="cells") as report:
            result = evaluate(model, tokenizer, suite, methods, out, EvalOptions(chunk=a.chunk), settings=settings,
                              progress=report)
        result.settings["run"] = {"argv": sys.argv[1:], "transformers": transformers.__version__,
                                  "kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else "0.5.5",
                                  "torch": torch.__version__, **threads_note()}
        result.save(out, plot=plot_quality_vs_bytes)
    from sinkscope.kv.evaluate import summary_markdown

    print(summary_markdown(result.summary()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
