"""The natural-repetition harm suite: ordinary documents that contain a repeated stretch, and what a patch does to
the model's predictions inside that stretch and after it.

A repetition patch acts only inside repetitions, so ordinary prose (WikiText) cannot show its harm: ordinary text
that *does* repeat can. The suite ships as package data in two separate sets:

* ``dev`` (``sinkscope/data/harm/dev/*.txt``): the set the patch is designed and tuned on.
* ``eval`` (``sinkscope/data/harm/eval/*.txt``): written at the same time, never used for a design decision; look
  at its results only once the design is frozen.

Each document is a UTF-8 text file::

    family: song          # song | laughter | table | log | code | count | emphasis
    format: text          # text (plain text, no special tokens) | chat (a user turn, optionally an answer)
    ---
    body, with the repeated stretch between U+27E6 and U+27E7 (the markers are removed)

In ``chat`` documents a line ``=== assistant ===`` separates the user's message from the assistant's answer;
the model's chat template renders them. Positions are classified by the token's characters: **inside** the
stretch, **after** it (everything that follows, to the end of the document), or before.

`harm_effects` compares the model with and without each patch on each document: per-token KL(original || patched)
of the next-token distribution inside and after the stretch, NLL of the tokens after the stretch, top-1
agreement, and whether the patch's repetition gate opened at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sinkscope.devices import model_device
from sinkscope.errors import InputError
from sinkscope.interventions.patch import SinkPatch, apply_patch

OPEN, CLOSE = "\u27e6", "\u27e7"
ASSISTANT_SPLIT = "=== assistant ==="
FAMILIES: tuple[str, ...] = ("song", "laughter", "table", "log", "code", "count", "emphasis")
FORMATS: tuple[str, ...] = ("text", "chat")
#: named sets shipped with the package
HARM_SETS: tuple[str, ...] = ("dev", "eval")


@dataclass(frozen=True)
class HarmDoc:
    """One document of the suite.

    Attributes:
        name: file stem; family: one of `FAMILIES`; format: ``text`` or ``chat``.
        user: the text (``text``) or the user's message (``chat``), markers removed.
        answer: the assistant's answer (``chat`` only, else "").
        stretch: (part, start, end): the repeated stretch as character offsets in ``user`` (part 0) or ``answer``
            (part 1).
    """

    name: str
    family: str
    format: str
    user: str
    answer: str
    stretch: tuple[int, int, int]


def _parse(name: str, raw: str) -> HarmDoc:
    head, sep, body = raw.partition("\n---\n")
    if not sep:
        raise InputError(f"harm document {name}: no '---' line between the header and the text")
    meta = {}
    for line in head.splitlines():
        k, _, v = line.partition(":")
        meta[k.strip()] = v.strip()
    family, fmt = meta.get("family", ""), meta.get("format", "text")
    if family not in FAMILIES:
        raise InputError(f"harm document {name}: unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    if fmt not in FORMATS:
        raise InputError(f"harm document {name}: unknown format {fmt!r}; choose text or chat")
    body = body.strip("\n")
    parts = [body]
    if fmt == "chat" and ASSISTANT_SPLIT in body:
        user, _, answer = body.partition(ASSISTANT_SPLIT)
        parts = [user.strip("\n"), answer.strip("\n")]
    elif ASSISTANT_SPLIT in body:
        raise InputError(f"harm document {name}: '{ASSISTANT_SPLIT}' only belongs in chat documents")
    if body.count(OPEN) != 1 or body.count(CLOSE) != 1:
        raise InputError(f"harm document {name}: mark exactly one repeated stretch with {OPEN} ... {CLOSE}")
    stretch = None
    clean = []
    for i, p in enumerate(parts):
        if OPEN in p:
            a = p.index(OPEN)
            b = p.index(CLOSE) - 1 if CLOSE in p else -1
            if b < a:
                raise InputError(f"harm document {name}: the stretch must open and close in the same part")
            stretch = (i, a, b)
            p = p.replace(OPEN, "").replace(CLOSE, "")
        clean.append(p)
    assert stretch is not None
    return HarmDoc(name, family, fmt, clean[0], clean[1] if len(clean) > 1 else "", stretch)


def harm_dir(name: str) -> Path:
    """Directory of a shipped harm set (``dev`` or ``eval``)."""
    if name not in HARM_SETS:
        raise InputError(f"unknown harm set {name!r}; choose {' or '.join(HARM_SETS)}, or give a directory")
    return Path(str(resources.files("sinkscope").joinpath("data", "harm", name)))


def load_harm_set(spec: str | Path) -> list[HarmDoc]:
    """The documents of a shipped set (``"dev"``, ``"eval"``) or of a directory of ``*.txt`` documents, by name.

    Raises:
        InputError: unknown set, missing directory, no documents, or a malformed document.
    """
    path = harm_dir(str(spec)) if str(spec) in HARM_SETS else Path(spec)
    if not path.is_dir():
        raise InputError(f"harm set not found: {spec} (give dev, eval or a directory of .txt documents)")
    files = sorted(path.glob("*.txt"))
    if not files:
        raise InputError(f"harm set {spec} is empty: no .txt documents in {path}")
    return [_parse(f.stem, f.read_text(encoding="utf-8")) for f in files]


@dataclass(frozen=True)
class EncodedDoc:
    """A document as token ids: ``ids`` (T,), and masks over positions (T,) for the stretch and what follows."""

    doc: HarmDoc
    ids: list[int]
    inside: list[bool]
    after: list[bool]


def encode_doc(tokenizer: Any, doc: HarmDoc) -> EncodedDoc:
    """Token ids of the document as the model sees it (chat documents through the chat template) and which
    positions lie inside / after the repeated stretch (by the characters each token covers)."""
    if doc.format == "chat":
        msgs = [{"role": "user", "content": doc.user}]
        if doc.answer:
            msgs.append({"role": "assistant", "content": doc.answer})
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=not doc.answer)
        else:
            text = f"User: {doc.user}\nAssistant: {doc.answer}"
    else:
        text = doc.user
    part, a, b = doc.stretch
    src = doc.answer if part == 1 else doc.user
    base = text.find(src) if part == 0 else text.find(src, text.find(doc.user) + len(doc.user))
    if base < 0:
        raise InputError(f"harm document {doc.name}: the chat template changed the text; cannot locate the stretch")
    start, end = base + a, base + b
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [int(i) for i in enc["input_ids"]]
    spans = enc["offset_mapping"]
    inside = [s < end and e > start for s, e in spans]
    last_inside = max((i for i, x in enumerate(inside) if x), default=-1)
    if last_inside < 0:
        raise InputError(f"harm document {doc.name}: no token inside the marked stretch")
    after = [i > last_inside for i in range(len(ids))]
    return EncodedDoc(doc, ids, inside, after)


@dataclass
class DocEffect:
    """A patch's effect on one document (per predicted token; position t predicts token t + 1).

    Attributes:
        gate_opened: positions where the patch's repetition gate opened (0: the patch never acted on it).
        kl_inside / kl_after: mean KL(original || patched) in nats over positions inside / after the stretch.
        kl_all: over every position.
        nll_after_original / nll_after_patched: mean NLL of the tokens after the stretch (nats).
        top1_inside / top1_after: share of positions whose most likely next token is unchanged.
        stretch_tokens / after_tokens: how many positions each mean is over.
    """

    name: str
    family: str
    tokens: int
    stretch_tokens: int
    after_tokens: int
    gate_opened: int
    edits: int
    kl_all: float
    kl_inside: float
    kl_after: float
    kl_after_max: float
    nll_all_original: float
    nll_all_patched: float
    nll_after_original: float
    nll_after_patched: float
    top1_inside: float
    top1_after: float


def _mean(x: Tensor) -> float:
    return float(x.mean()) if x.numel() else float("nan")


def gate_closed_everywhere(model: nn.Module, patch: SinkPatch, ids: Sequence[int]) -> bool:
    """True when ``patch`` has a repetition gate that opens nowhere in ``ids`` (one unpadded row): every rule of
    such a patch is gated, so the patched model then computes exactly what the original does."""
    if patch.gate is None:
        return False
    from sinkscope.interventions.patch import repetition_gate

    emb = model.get_input_embeddings().weight.detach()
    t = torch.tensor([list(ids)], device=emb.device)
    zeros = torch.zeros(1, patch.gate.window, dtype=torch.long, device=emb.device)
    return not bool(repetition_gate(emb, t, torch.ones_like(t), zeros, zeros, patch.gate).any())


def _effect(enc: EncodedDoc, lo: Tensor, lp: Tensor, ids: Tensor, gated: int, edits: int) -> DocEffect:
    kl = (lo.exp() * (lo - lp)).sum(-1).clamp_min(0.0).cpu()  # (T,)
    same = (lo.argmax(-1) == lp.argmax(-1)).float().cpu()
    inside = torch.tensor(enc.inside)
    after = torch.tensor(enc.after)
    tgt = ids[0, 1:, None]
    nll_o = -lo[:-1].gather(-1, tgt)[:, 0].cpu()  # (T - 1,): NLL of token t + 1
    nll_p = -lp[:-1].gather(-1, tgt)[:, 0].cpu()
    tgt_after = after[1:]  # targets after the stretch
    return DocEffect(enc.doc.name, enc.doc.family, len(enc.ids), int(inside.sum()), int(after.sum()), gated, edits,
                     _mean(kl), _mean(kl[inside]), _mean(kl[after]),
                     float(kl[after].max()) if bool(after.any()) else float("nan"),
                     _mean(nll_o), _mean(nll_p), _mean(nll_o[tgt_after]), _mean(nll_p[tgt_after]),
                     _mean(same[inside]), _mean(same[after]))


@torch.no_grad()
def harm_effects(model: nn.Module, tokenizer: Any, patches: dict[str, SinkPatch], docs: Sequence[HarmDoc]
                 ) -> dict[str, list[DocEffect]]:
    """Every patch against the original model on every document (one row, no padding, no cache): the original
    forward is run once per document; a patch whose gate opens nowhere in a document is not run (it computes
    exactly the original, see `gate_closed_everywhere`)."""
    if not docs:
        raise InputError("empty harm set: no documents to measure")
    device = model_device(model)
    out: dict[str, list[DocEffect]] = {k: [] for k in patches}
    for d in docs:
        enc = encode_doc(tokenizer, d)
        ids = torch.tensor([enc.ids], device=device)
        lo = model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)[0]  # (T, V)
        for name, patch in patches.items():
            if gate_closed_everywhere(model, patch, enc.ids):
                out[name].append(_effect(enc, lo, lo, ids, 0, 0))
                continue
            with apply_patch(model, patch) as h:
                lp = model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)[0]
                gated, edits = h.n_gated, h.n_clamped
            out[name].append(_effect(enc, lo, lp, ids, gated, edits))
    return out


def summarise_harm(effects: Sequence[DocEffect]) -> list[dict[str, Any]]:
    """One row per family plus an ``all`` row: documents, share where the gate opened, token-weighted mean KL
    inside / after the stretch and overall, NLL after the stretch (original, patched), its perplexity change,
    top-1 agreement inside / after, and the whole documents' perplexity change."""
    import math

    rows = []
    groups: dict[str, list[DocEffect]] = {}
    for e in effects:
        groups.setdefault(e.family, []).append(e)
    order = [f for f in FAMILIES if f in groups] + sorted(set(groups) - set(FAMILIES))
    for fam, es in [(f, groups[f]) for f in order] + [("all", list(effects))]:
        def wmean(attr: str, weight: str, es: list[DocEffect] = es) -> float:
            w = [getattr(e, weight) for e in es if not math.isnan(getattr(e, attr))]
            v = [getattr(e, attr) for e in es if not math.isnan(getattr(e, attr))]
            return sum(a * b for a, b in zip(v, w)) / sum(w) if w and sum(w) else float("nan")

        nll_o, nll_p = wmean("nll_after_original", "after_tokens"), wmean("nll_after_patched", "after_tokens")
        all_o, all_p = wmean("nll_all_original", "tokens"), wmean("nll_all_patched", "tokens")
        rows.append({"family": fam, "documents": len(es), "gate_opened": sum(e.gate_opened > 0 for e in es),
                     "kl_inside": wmean("kl_inside", "stretch_tokens"), "kl_after": wmean("kl_after", "after_tokens"),
                     "kl_all": wmean("kl_all", "tokens"),
                     "kl_after_max": max((e.kl_after_max for e in es if not math.isnan(e.kl_after_max)), default=0.0),
                     "nll_after_original": nll_o, "nll_after_patched": nll_p,
                     "ppl_after_change": math.exp(nll_p - nll_o) - 1.0, "ppl_change": math.exp(all_p - all_o) - 1.0,
                     "top1_inside": wmean("top1_inside", "stretch_tokens"),
                     "top1_after": wmean("top1_after", "after_tokens")})
    return rows


def effects_to_json(effects: Sequence[DocEffect]) -> list[dict[str, Any]]:
    return [asdict(e) for e in effects]
