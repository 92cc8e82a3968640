"""The natural-repetition harm suite: the shipped sets, document parsing and its errors, stretch positions, and a
patch's measured effect (exactly zero where the gate stays closed, measured inside / after where it opens)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sinkscope.errors import InputError
from sinkscope.interventions.patch import RepetitionGate, SinkPatch
from sinkscope.repetition.harm import (
    CLOSE,
    FAMILIES,
    OPEN,
    encode_doc,
    harm_effects,
    load_harm_set,
    summarise_harm,
)


@pytest.mark.parametrize("name", ["dev", "eval"])
def test_shipped_sets_cover_every_family(name):
    docs = load_harm_set(name)
    assert len(docs) >= 30
    assert {d.family for d in docs} == set(FAMILIES)
    for d in docs:
        assert OPEN not in d.user + d.answer and CLOSE not in d.user + d.answer
        part, a, b = d.stretch
        assert 0 <= a < b <= len(d.answer if part else d.user)


def test_dev_and_eval_sets_are_different_documents():
    dev, ev = load_harm_set("dev"), load_harm_set("eval")
    assert not {d.user for d in dev} & {d.user for d in ev}


def _write(tmp_path: Path, name: str, text: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / f"{name}.txt").write_text(text, encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize("text, msg", [
    ("family: song\nformat: text\n---\nno stretch here\n", "exactly one repeated stretch"),
    (f"family: song\nformat: text\n---\n{OPEN}a{CLOSE} and {OPEN}b{CLOSE}\n", "exactly one repeated stretch"),
    (f"family: opera\nformat: text\n---\n{OPEN}la la{CLOSE}\n", "unknown family 'opera'"),
    (f"family: song\nformat: poem\n---\n{OPEN}la la{CLOSE}\n", "unknown format 'poem'"),
    (f"family: song\n{OPEN}la la{CLOSE}\n", "no '---' line"),
    (f"family: song\nformat: text\n---\n{OPEN}la\n=== assistant ===\nla{CLOSE}\n", "only belongs in chat"),
])
def test_malformed_documents_are_one_line_errors(tmp_path, text, msg):
    with pytest.raises(InputError, match=msg) as e:
        load_harm_set(_write(tmp_path, "bad", text))
    assert "\n" not in str(e.value)


def test_unknown_and_empty_sets_are_errors(tmp_path):
    with pytest.raises(InputError, match="harm set not found"):
        load_harm_set(tmp_path / "nope")
    with pytest.raises(InputError, match="empty"):
        load_harm_set(tmp_path)
    with pytest.raises(InputError, match="empty harm set"):
        harm_effects(None, None, {"patch": SinkPatch([], "x")}, [])


def test_stretch_positions_follow_the_tokens(tmp_path, tiny_tok):
    d = _write(tmp_path, "d", f"family: count\nformat: text\n---\nthe word {OPEN}dog dog dog dog{CLOSE} cat tree\n")
    (doc,) = load_harm_set(d)
    enc = encode_doc(tiny_tok, doc)
    words = [tiny_tok.decode([i]) for i in enc.ids]
    assert words == ["the", "word", "dog", "dog", "dog", "dog", "cat", "tree"]
    assert enc.inside == [False, False, True, True, True, True, False, False]
    assert enc.after == [False] * 6 + [True, True]


def test_chat_documents_render_through_the_template(tmp_path, tiny_tok):
    d = _write(tmp_path, "c", f"family: count\nformat: chat\n---\n{OPEN}dog dog dog{CLOSE} a text\n"
                              "=== assistant ===\nthe word\n")
    (doc,) = load_harm_set(d)
    assert doc.user == "dog dog dog a text" and doc.answer == "the word" and doc.stretch == (0, 0, 11)
    enc = encode_doc(tiny_tok, doc)
    inside = [tiny_tok.decode([i]) for i, x in zip(enc.ids, enc.inside) if x]
    assert inside == ["dog", "dog", "dog"]
    after = [tiny_tok.decode([i]) for i, x in zip(enc.ids, enc.after) if x]
    assert after[:2] == ["a", "text"] and after[-2:] == ["the", "word"]


@torch.no_grad()
def test_harm_effect_is_zero_where_the_gate_stays_closed_and_measured_where_it_opens(tmp_path, tiny_llama,
                                                                                    tiny_tok):
    run = " ".join(["dog"] * 12)
    _write(tmp_path, "long", f"family: song\nformat: text\n---\na text {OPEN}{run}{CLOSE} the word cat tree poem\n")
    _write(tmp_path, "short", f"family: table\nformat: text\n---\na text {OPEN}dog dog{CLOSE} the word cat tree\n")
    docs = load_harm_set(tmp_path)
    patch = SinkPatch([], "x", gate=RepetitionGate(4, 0.9), attention_dedup=True)
    eff = {e.name: e for e in harm_effects(tiny_llama, tiny_tok, {"patch": patch}, docs)["patch"]}
    short, long = eff["short"], eff["long"]
    assert short.gate_opened == 0 and short.kl_all == 0.0 and short.top1_after == 1.0
    assert short.nll_after_original == short.nll_after_patched
    # the run of 12 copies opens the gate from its 5th copy on: its KL is measured inside and after
    assert long.gate_opened == 12 - 4 and long.stretch_tokens == 12 and long.after_tokens == 5
    assert long.kl_inside > 0 and long.kl_after > 0
    rows = {r["family"]: r for r in summarise_harm(list(eff.values()))}
    assert rows["song"]["gate_opened"] == 1 and rows["table"]["gate_opened"] == 0 and rows["all"]["documents"] == 2
    assert rows["all"]["kl_after"] == pytest.approx((long.kl_after * 5 + short.kl_after * short.after_tokens)
                                                    / (5 + short.after_tokens))


@torch.no_grad()
def test_skipping_a_closed_gate_gives_what_running_the_patch_gives(tmp_path, tiny_llama, tiny_tok):
    """harm_effects does not run a gated patch on a document where its gate opens nowhere; running it gives
    bit-identical logits (so the skip changes no number), and a document where it opens is run."""
    from sinkscope.interventions.patch import apply_patch
    from sinkscope.repetition.harm import gate_closed_everywhere

    patch = SinkPatch([], "x", gate=RepetitionGate(4, 0.9), attention_dedup=True)
    closed = encode_doc(tiny_tok, load_harm_set(_write(tmp_path / "a", "a", f"family: song\nformat: text\n---\n"
                                                       f"a text {OPEN}dog dog{CLOSE} the word\n"))[0])
    opened = encode_doc(tiny_tok, load_harm_set(_write(tmp_path / "b", "b", f"family: song\nformat: text\n---\n"
                                                       f"a {OPEN}{' '.join(['dog'] * 8)}{CLOSE} cat\n"))[0])
    assert gate_closed_everywhere(tiny_llama, patch, closed.ids)
    assert not gate_closed_everywhere(tiny_llama, patch, opened.ids)
    assert not gate_closed_everywhere(tiny_llama, SinkPatch([], "x"), closed.ids)  # ungated rules always run
    for enc, same in ((closed, True), (opened, False)):
        ids = torch.tensor([enc.ids])
        base = tiny_llama(input_ids=ids).logits
        with apply_patch(tiny_llama, patch) as h:
            assert torch.equal(tiny_llama(input_ids=ids).logits, base) == same and (h.n_gated == 0) == same
