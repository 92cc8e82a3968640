"""Fixtures for the repeated-token tests: a tiny word-level tokenizer and a tiny Llama saved with it."""

from __future__ import annotations

from pathlib import Path

import pytest

WORDS = ["poem", "cat", "dog", "book", "tree", "Repeat", "the", "word", "forever", "following", "'", '"', ".",
         ":", "User", "Assistant", "a", "text"]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    for i in range(len(vocab), 99):
        vocab[f"t{i}"] = i
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="session")
def tiny_tok():
    return make_tokenizer()


@pytest.fixture()
def tiny_llama():
    from sinkscope.models.tiny import tiny_model

    return tiny_model("llama", attn_implementation="sdpa")


@pytest.fixture()
def tiny_dir(tmp_path: Path, tiny_llama, tiny_tok) -> Path:
    """A saved tiny Llama + tokenizer directory (loadable by `sinkscope.load_model`)."""
    d = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(d)
    tiny_tok.save_pretrained(d)
    return d
