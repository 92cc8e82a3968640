"""Bigram-Backcopy and text-LM tasks: the sequence rules of RESEARCH.md §5 and Gu et al.'s data switches."""

from __future__ import annotations

from pathlib import Path

import torch

from sinkscope.tasks.bigram_backcopy import BigramBackcopy
from sinkscope.tasks.text_lm import TextLM


def test_bigram_backcopy_rules(corpus: Path) -> None:
    task = BigramBackcopy.from_file(corpus, n_chars=20, n_triggers=3)
    assert task.vocab_size == 21 and task.bos_id == 20
    assert set(task.chars[:2]) == {" ", "e"}  # triggers are the most frequent characters
    torch.testing.assert_close(task.transition.sum(-1), torch.ones(20))
    b = task.batch(seed=1, step=5, batch_size=32, seq_len=40)
    x = torch.cat([b.idx, b.targets[:, -1:]], 1)  # the full sampled sequence (B, 41)
    assert (x[:, 0] == task.bos_id).all() and (x[:, 1:] != task.bos_id).all()  # BOS first, never copied
    assert not task.is_trigger[x[:, 1]].any()  # first character drawn without triggers
    trig = task.is_trigger[x]
    assert not (trig[:, 1:] & trig[:, :-1]).any()  # two triggers never follow each other
    after = trig[:, 1:-1]
    assert (x[:, 2:][after] == x[:, :-2][after]).all()  # x[t+1] = x[t-1] after a trigger
    assert torch.equal(b.parts["copy"], task.is_trigger[b.idx]) and b.loss_mask.all()
    assert (b.oracle_nll[b.parts["copy"]] == 0).all() and (b.oracle_nll[b.parts["bigram"]] > 0).any()
    # batches are a pure function of (seed, step)
    assert torch.equal(task.batch(1, 5, 32, 40).idx, b.idx) and not torch.equal(task.batch(1, 6, 32, 40).idx, b.idx)


def test_bigram_rows_follow_corpus_statistics() -> None:
    task = BigramBackcopy.from_text("ab" * 500 + "c", n_chars=3, n_triggers=1)
    a, b = task.chars.index("a"), task.chars.index("b")
    assert task.transition[a, b] > 0.99 and task.transition[b, a] > 0.99


def test_text_switches(corpus: Path) -> None:
    text = corpus.read_text()
    plain = TextLM.from_text(text, bos=False).batch(0, 0, 4, 16)
    assert not (plain.idx[:, 0] == 256).any() and torch.equal(plain.idx[:, 1:], plain.targets[:, :-1])
    fixed = TextLM.from_text(text, bos=True, fixed_token_pos=3, fixed_token_id=7).batch(0, 0, 4, 16)
    assert (fixed.idx[:, 0] == 256).all() and (fixed.idx[:, 3] == 7).all()
    prefix = TextLM.from_text(text, prefix_len=5).batch(0, 0, 4, 16)
    assert prefix.prefix_len == 5 and not prefix.loss_mask[:, :4].any() and prefix.loss_mask[:, 4:].all()
    ev = TextLM.from_text(text, random_token_pos=2).eval_batch(0, 8, 16)
    assert ev.classes["text"].any() and ev.classes["random"].any()
    assert not (ev.loss_mask & ev.classes["random"]).any()
