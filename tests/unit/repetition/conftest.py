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
    from sinkscope.models.random_hf import tiny_model

    return tiny_model("llama", attn_implementation="sdpa")


@pytest.fixture()
def tiny_dir(tmp_path: Path, tiny_llama, tiny_tok) -> Path:
    """A saved tiny Llama + tokenizer directory (loadable by `sinkscope.load_model`)."""
    d = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(d)
    tiny_tok.save_pretrained(d)
    return d


def _padded_and_cached_match(model, seqs, decode_steps: int):
    """Left-padded batch == each row alone; prefill + ``decode_steps`` cached single-token steps == the full
    forward. Returns the padded ids, mask and full logits."""
    import torch

    from sinkscope.compat import cache_kwargs, output_cache
    from sinkscope.inputs import pad_batch

    ids, mask = pad_batch(seqs, 0, side="left")
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        for b, s in enumerate(seqs):
            alone = model(input_ids=torch.tensor([s])).logits[0]
            torch.testing.assert_close(full[b, -len(s):], alone, atol=1e-4, rtol=1e-4)
        T = ids.shape[1]
        cache = model(input_ids=ids[:, :T - decode_steps], attention_mask=mask[:, :T - decode_steps],
                      use_cache=True)
        cache = output_cache(cache)
        for t in range(T - decode_steps, T):
            step = model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], **cache_kwargs(model, cache),
                         use_cache=True)
            cache = output_cache(step)
            torch.testing.assert_close(step.logits[:, 0], full[:, t], atol=1e-4, rtol=1e-4)
    return ids, mask, full


def _batched_generate_matches(model, seqs, max_new_tokens: int):
    """Greedy generation of a left-padded batch == each row alone; returns the batch's new tokens (B, N)."""
    import torch

    from sinkscope.inputs import pad_batch

    ids, mask = pad_batch(seqs, 0, side="left")
    batched = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=0)[:, ids.shape[1]:]
    for b, s in enumerate(seqs):
        alone = model.generate(input_ids=torch.tensor([s]), max_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=0)[0, len(s):]
        assert batched[b].tolist() == alone.tolist()
    return batched


@pytest.fixture(scope="session")
def padded_and_cached_match():
    return _padded_and_cached_match


@pytest.fixture(scope="session")
def batched_generate_matches():
    return _batched_generate_matches
