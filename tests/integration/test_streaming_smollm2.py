"""StreamingLLM on the real SmolLM2: window-only breaks after eviction, sinks + window stays near re-computation."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from sinkscope.compat import cache_kwargs
from sinkscope.streaming.cache import sink_cache
from sinkscope.streaming.generate import stream_generate
from sinkscope.streaming.ppl import evaluate_stream

pytestmark = pytest.mark.slow

#: Plain English prose written for this test (~450 tokens), so the test needs no data file.
TEXT = """The lighthouse on the northern cape was built in 1851, after a winter in which three ships were lost on
the rocks within a single month. The keepers who lived there kept a daily log, and many of those books survive in
the county archive. They describe the weather, the state of the lamp, the ships that passed, and the small events
of a life spent far from any town. In the first years the light burned whale oil, which had to be carried up the
narrow stairs every evening. Later it burned paraffin, and in the last decades before the station was automated it
ran on electricity from a diesel generator that the keepers maintained themselves.

The work was not difficult, but it never stopped. The lens had to be cleaned every morning, because a thin film of
soot or salt could dim the beam by a third. The brass had to be polished, the windows wiped, the clockwork that
turned the lens wound by hand every few hours. On foggy nights the keepers also sounded a horn, and the log records
one storm in which the horn was sounded for fifty hours without a break. The families of the keepers lived in two
small cottages behind the tower. Their children walked four miles to the school in the village, and in bad weather
they stayed at home and were taught by their mothers from a box of books sent by the lighthouse board.

Supplies came by boat once a fortnight in summer and once a month in winter, when the sea allowed. The keepers grew
potatoes and cabbages in a walled garden, kept a few sheep on the headland, and caught fish from the rocks below
the tower. Letters from the board arrived with the supplies, and most of them were about paint, oil and the proper
way to fill in the weekly returns. One inspector wrote that the station was the cleanest on the whole coast, and
the keeper copied the sentence into the log in large letters.

When the light was automated in 1987 the last keeper locked the door of the tower and handed the key to an engineer
from the city. The cottages were sold, and today one of them is a small museum where visitors can read the old logs,
climb the stairs, and look out over the same rocks that the light was built to mark."""


@pytest.fixture(scope="module")
def stream(smollm2):
    model, tok = smollm2
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > 400
    return torch.tensor(ids[:420])


def test_window_breaks_sinks_stay_near_recompute(smollm2, stream) -> None:
    model, _ = smollm2
    res = evaluate_stream(model, stream, n_sink=4, window=60, policies=["window", "sinks", "recompute"],
                          batch_size=32, chunk=64)
    after = {k: v.ppl_after(4 + 60 + 1) for k, v in res.policies.items()}  # tokens predicted after eviction
    before = {k: v.ppl_after(0) for k, v in res.policies.items()}
    # window-only collapses once the first tokens are evicted; keeping 4 sinks restores the recompute quality
    assert after["window"] > 2.0 * after["sinks"], after
    assert after["sinks"] < 1.3 * after["recompute"], after
    assert before["window"] > before["sinks"]
    # the bounded caches never grow: sinks (token by token) holds 4 + 60 + the ring slot, window (exact blocks of 64
    # queries) the 64-token budget plus one block; 46080 bytes of fp32 K/V per token (30 layers x 3 kv heads x 64 x 2)
    assert res.policies["sinks"].mode == "token" and res.policies["window"].mode == "fast"
    assert res.policies["sinks"].memory["peak_mem_mb"] == 65 * 46080 / 2**20
    assert res.policies["window"].memory["peak_mem_mb"] == (64 + 64) * 46080 / 2**20


def test_plain_cache_equals_band_masked_forward_on_smollm2(smollm2, stream) -> None:
    """GQA (9 heads, 3 kv heads), 30 layers: streaming without re-assignment = one band-masked full forward."""
    model, _ = smollm2
    T, S, W = 48, 2, 12
    ids = stream[:T][None]
    q, k = torch.arange(T)[:, None], torch.arange(T)[None]
    mask = torch.zeros(T, T)
    mask[~((k <= q) & ((k < S) | (k >= q - W)))] = torch.finfo(torch.float32).min
    cache = sink_cache(model, S, W, reassign=False)
    with torch.no_grad():
        full = model(ids, attention_mask=mask[None, None]).logits[0]
        streamed = torch.cat([model(ids[:, t:t + 1], **cache_kwargs(model, cache)).logits[0] for t in range(T)])
    torch.testing.assert_close(streamed, full, atol=2e-4, rtol=1e-4)


def test_generate_and_cli(smollm2, tmp_path) -> None:
    from sinkscope.cli.__main__ import main

    model, tok = smollm2
    prompt = tok("The lighthouse keeper", add_special_tokens=False)["input_ids"]
    toks = list(stream_generate(model, prompt, n_sink=4, window=12, max_new_tokens=24))
    assert len(toks) == 24 and len({t.kv_bytes for t in toks[14:]}) == 1  # full after 16 tokens
    out = model.generate(torch.tensor([prompt]), **cache_kwargs(model, sink_cache(model, 4, 12)), max_new_tokens=24,
                         min_new_tokens=24, do_sample=False)
    assert out[0, len(prompt):].tolist() == [t.token_id for t in toks]

    text = tmp_path / "stream.txt"
    text.write_text(TEXT)
    assert main(["stream", "eval", "--file", str(text), "--tokens", "40", "--sinks", "2", "--window", "10",
                 "--policies", "window,sinks,recompute", "--out", str(tmp_path / "ev")]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert set(summary["policies"]) == {"window", "sinks", "recompute"}
    assert all({"ppl", "peak_mem_mb", "tokens_per_s"} <= set(p) for p in summary["policies"].values())
    with open(tmp_path / "ev" / "tokens.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 39 and rows[0].keys() == {"policy", "position", "nll"}
    assert (tmp_path / "ev" / "log_ppl.png").stat().st_size > 0
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # the CLI closed its figure (an in-process caller would otherwise leak it)
    assert main(["stream", "eval", "--file", str(text), "--out", str(tmp_path / "x"), "--policies", "sink"]) == 2


def test_block_mode_equals_token_by_token_on_smollm2(smollm2, stream) -> None:
    """The exact block mode (band mask, chunks of 24 queries) gives the token-by-token NLLs of the plain cache."""
    from sinkscope.streaming.ppl import run_policy

    model, _ = smollm2
    ids = stream[:64]
    token = run_policy(model, ids, "sinks_plain", 4, 16, mode="token")
    fast = run_policy(model, ids, "sinks_plain", 4, 16, chunk=24)
    assert fast.mode == "fast" and token.mode == "token"
    assert (fast.nll - token.nll).abs().max().item() < 1e-4


def test_left_padded_batch_equals_rows_alone_on_smollm2(smollm2) -> None:
    """Batched left-padded generation with the sink cache (4 sinks + 12 window, far past eviction) gives each
    prompt's own greedy continuation."""
    model, tok = smollm2
    prompts = [tok(t, add_special_tokens=False)["input_ids"]
               for t in ("The lighthouse keeper wrote in the log that", "Supplies came by boat")]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id or 0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw = {"max_new_tokens": 20, "min_new_tokens": 20, "do_sample": False, "pad_token_id": tok.pad_token_id or 0}
    batch = model.generate(ids, attention_mask=mask, **cache_kwargs(model, sink_cache(model, 4, 12)), **kw)
    for row, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p]), **cache_kwargs(model, sink_cache(model, 4, 12)), **kw)
        assert batch[row, width:].tolist() == alone[0, len(p):].tolist()
