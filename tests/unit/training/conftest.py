"""Fixtures for training tests: a small synthetic corpus and a tiny run config (offline, seconds)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from sinkscope.training.config import RunConfig, config_from_dict


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 20k-character Markov text over 24 characters (no dependence on ../shared/data)."""
    rng = random.Random(0)
    alphabet = list(" etaoinshrdlucmfwypvbgk.")
    nxt = {c: rng.sample(alphabet, 6) for c in alphabet}
    c, out = "t", []
    for _ in range(20_000):
        c = rng.choice(nxt[c] + [" ", "e"])
        out.append(c)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("".join(out))
    return path


def tiny_dict(corpus: Path, **sections: dict) -> dict:
    d = {
        "model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "block_size": 16},
        "data": {"task": "bigram_backcopy", "corpus": str(corpus), "n_chars": 20, "n_triggers": 2,
                 "seq_len": 16, "batch_size": 8, "eval_batch_size": 8},
        "optim": {"lr": 3e-3},
        "train": {"steps": 12, "eval_every": 3, "ckpt_every": 5, "plots": False, "threads": 1},
    }
    for k, v in sections.items():
        d[k] = {**d[k], **v}
    return d


@pytest.fixture
def tiny_cfg(corpus: Path) -> RunConfig:
    return config_from_dict(tiny_dict(corpus))
