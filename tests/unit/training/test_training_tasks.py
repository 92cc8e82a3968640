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


def test_bigram_backcopy_without_bos(corpus: Path) -> None:
    task = BigramBackcopy.from_file(corpus, n_chars=20, n_triggers=3, bos=False)
    b = task.batch(seed=2, step=0, batch_size=64, seq_len=40)
    x = torch.cat([b.idx, b.targets[:, -1:]], 1)
    assert (x != task.bos_id).all() and task.vocab_size == 21  # no BOS anywhere; the id stays reserved
    assert not task.is_trigger[x[:, 0]].any()  # position 0 is a first character, never a trigger
    first = torch.bincount(x[:, 0], minlength=20).float()
    assert first[task.first_dist == 0].sum() == 0  # drawn from the first-character distribution
    trig = task.is_trigger[x]
    after = trig[:, 1:-1]
    assert (x[:, 2:][after] == x[:, :-2][after]).all()  # the copy rule holds from position 1 on
    assert b.classes["non_trigger"][:, 0].all()  # position 0 is an ordinary (non-trigger) query
    assert torch.isfinite(b.oracle_nll).all() and (b.oracle_nll[:, 0] > 0).all()  # its target is a bigram step
    assert task.describe()["bos"] is False


def _write_tree(root: Path) -> None:
    (root / "pkg" / "sub").mkdir(parents=True)
    for i in range(30):
        (root / "pkg" / f"m{i:02d}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 20)
    (root / "pkg" / "sub" / "copy.py").write_text((root / "pkg" / "m00.py").read_text())  # duplicate content
    (root / "pkg" / "sub" / "blob.bin").write_bytes(b"\x00\x01\x02" * 10)  # not text
    (root / "pkg" / "empty.py").write_text("")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.py").write_text("hidden = 1\n")


def test_text_corpus_from_directory_and_glob(tmp_path: Path) -> None:
    _write_tree(tmp_path)
    task = TextLM.from_file(tmp_path, eval_split=0.2)
    info = task.describe()
    assert info["candidate_files"] == 33 and info["files"] == 30  # hidden folder ignored
    assert info["duplicates_dropped"] == 1 and info["skipped_empty_or_binary"] == 2
    held = info["eval_files"]
    assert 1 <= len(held) < 30 and info["train_files"] + len(held) == 30
    texts = {f"pkg/m{i:02d}.py": (tmp_path / "pkg" / f"m{i:02d}.py").read_bytes() for i in range(30)}
    eval_bytes, train_bytes = bytes(task.eval_ids.tolist()), bytes(task.train_ids.tolist())
    for rel, data in texts.items():  # whole files on one side only
        assert (data in eval_bytes) == (rel in held) and (data in train_bytes) == (rel not in held)
    assert len(task.train_ids) == info["train_bytes"] and task.eval_batch(0, 4, 16).idx.shape == (4, 16)
    # the split is decided per path relative to the root, so a glob from the same root holds out the same files
    again = TextLM.from_file(str(tmp_path / "**" / "*.py"), eval_split=0.2).describe()
    assert again["eval_files"] == held and again["root"] == str(tmp_path.resolve())


def test_text_corpus_errors(tmp_path: Path) -> None:
    import pytest

    from sinkscope.errors import InputError
    from sinkscope.tasks.text_lm import corpus_files

    with pytest.raises(InputError, match="matches no files"):
        TextLM.from_file(str(tmp_path / "*.txt"))
    (tmp_path / "one.txt").write_text("only one file here\n")
    with pytest.raises(InputError, match="1 distinct text file"):
        TextLM.from_file(str(tmp_path / "*.txt"))
    with pytest.raises(InputError, match="data file not found"):
        TextLM.from_file(tmp_path / "nope.txt")
    root, files = corpus_files("python-stdlib")  # the running Python's standard library, without site-packages
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files) and (root / "os.py") in files


def _is_corpus_substring(text: bytes, row: torch.Tensor) -> bool:
    return bytes(row.tolist()) in text


def test_random_token_at_zero_keeps_the_text_after_it(corpus: Path) -> None:
    """Gu et al.'s ``x_1 ~ Uniform(V)`` without BOS: position 0 is a per-row uniform token (never BOS, not the
    corpus's 24 characters' distribution), every later position is the chunk's own text, in train and eval rows."""
    text = corpus.read_bytes()
    task = TextLM.from_text(corpus.read_text(), bos=False, random_token_pos=0)
    b = task.batch(seed=0, step=0, batch_size=4096, seq_len=16)
    first = b.idx[:, 0]
    assert not (first == task.bos_id).any()
    counts = torch.bincount(first, minlength=task.vocab_size)[: task.bos_id].float()
    assert (counts > 0).sum() == 256  # every byte drawn, not just the corpus's 24 characters
    assert counts.max() < 3 * counts.mean()  # roughly uniform (expected 16 per byte)
    x = torch.cat([b.idx, b.targets[:, -1:]], 1)
    assert all(_is_corpus_substring(text, row[1:]) for row in x[:64])  # the rest is untouched text
    assert not all(_is_corpus_substring(text, row) for row in x[:64])
    ev = task.eval_batch(0, 64, 16)
    assert not (ev.idx[:, 0] == task.bos_id).any() and len(set(ev.idx[:, 0].tolist())) > 24


def test_fixed_token_at_j_in_every_row(corpus: Path) -> None:
    """A fixed token at position j, no BOS: column j is that token in every training and evaluation row (text and
    random-token rows); the positions around it are the chunk's own text."""
    text = corpus.read_bytes()
    task = TextLM.from_text(corpus.read_text(), bos=False, fixed_token_pos=5, fixed_token_id=0)
    b = task.batch(seed=0, step=1, batch_size=256, seq_len=16)
    assert (b.idx[:, 5] == 0).all() and (b.targets[:, 4] == 0).all()
    x = torch.cat([b.idx, b.targets[:, -1:]], 1)
    assert all(_is_corpus_substring(text, row[:5]) and _is_corpus_substring(text, row[6:]) for row in x[:64])
    assert not (x[:, :5] == 0).any() and not (x[:, 6:] == 0).any()  # byte 0 occurs only where it was put
    ev = task.eval_batch(0, 64, 16)
    assert (ev.idx[:, 5] == 0).all() and ev.classes["random"][:, 0].any()
