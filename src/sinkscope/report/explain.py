"""The "what this means" paragraphs of `sinkscope report`, written from the measured numbers.

Each function takes the numbers of one section (plain dicts, as stored in ``report.json``) and returns a list of
paragraphs. Every sentence depends on the numbers: thresholds decide which statement is made.
"""

from __future__ import annotations

from typing import Any


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _layers(ls: list[int]) -> str:
    if not ls:
        return "none"
    runs, start, prev = [], ls[0], ls[0]
    for x in ls[1:] + [None]:  # type: ignore[list-item]
        if x is not None and x == prev + 1:
            prev = x
            continue
        runs.append(f"{start}" if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(runs)


def explain_model(card: dict[str, Any]) -> list[str]:
    """Paragraphs for the model card: architecture facts that matter for sinks."""
    out = []
    H, Hkv = card["n_heads"], card["n_kv_heads"]
    gqa = (f"grouped-query attention: {H // max(1, Hkv)} query heads share each of its {Hkv} key/value heads, so a "
           "value-state drain is shared by a whole group" if Hkv and Hkv < H else "one key/value head per query head")
    out.append(f"This is a {card['model_type']} model with {card['n_layers']} layers of {H} attention heads "
               f"({card['n_layers'] * H} heads in all) and {gqa}.")
    if card.get("bos_added"):
        out.append("Its tokenizer puts a BOS token at position 0, so the first-token sink below sits on a special "
                   "token that carries no content.")
    else:
        out.append("Its tokenizer adds no BOS token: position 0 is the first real token of the input, so any sink "
                   "at position 0 is a content token that the model has turned into a sink.")
    if card.get("learned_sinks"):
        out.append("It has learned sink logits: part of the attention goes to a virtual key with no value.")
    if card.get("output_gate"):
        out.append("Its attention output is gated, which usually weakens the first-token sink.")
    return out


def explain_sinks(s: dict[str, Any]) -> list[str]:
    """Paragraphs for the attention-sink section.

    ``s`` holds, per input kind: ``sink0`` (Sink_0^eps), ``top_other`` ({position, sink_ratio} of the strongest
    non-initial position), ``formation_layer`` (first layer where at least half the heads sink on token 0, or
    None) and ``eps``.
    """
    kinds = s["kinds"]
    eps = s["eps"]
    vals = {k: v["sink0"] for k, v in kinds.items()}
    parts = [f"{_pct(v)} on {k}" for k, v in vals.items()]
    desc = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    out = [f"Token 0 is an attention sink (alpha_0 > {eps}) for {desc.replace(' on ', ' of all heads on ', 1)}."]
    hi, lo = max(vals, key=vals.get), min(vals, key=vals.get)  # type: ignore[arg-type]
    if vals[hi] - vals[lo] < 0.1:
        out.append("The share barely changes with the input, so the sink is a property of the first position, "
                   "not of what the first token says.")
    elif vals[lo] < 0.1 and vals[hi] >= 0.3:
        best_lo = max((t["sink_ratio"] for t in kinds[lo].get("top_sinks", [])), default=0.0)
        out.append(f"On {lo} the first-token sink disappears ({_pct(vals[lo])} of heads), and no other position "
                   f"takes its place (best position: {_pct(best_lo)} of heads): attention spreads over many "
                   "positions instead. When every token looks the same, nothing marks token 0 as the place to "
                   "park attention; this is the state in which repeated-token prompts make models diverge "
                   "(Yona et al. 2503.08908).")
    else:
        out.append(f"The sink depends on the input: it is strongest on {hi} and weakest on {lo} "
                   f"({_pct(vals[hi])} vs {_pct(vals[lo])} of heads); heads that leave the sink on {lo} are "
                   "doing input-specific work there.")
    others = {k: v["top_other"] for k, v in kinds.items() if v.get("top_other")}
    strong = {k: o for k, o in others.items() if o["sink_ratio"] >= 0.1}
    if not strong:
        best = max((o["sink_ratio"] for o in others.values()), default=0.0)
        out.append(f"No other position comes close: the best non-initial position is a sink for at most "
                   f"{_pct(best)} of heads. The model has one sink, the first token.")
    else:
        parts = [f"position {o['position']} on {k} ({_pct(o['sink_ratio'])} of heads)" for k, o in strong.items()]
        out.append("There are secondary sinks: " + "; ".join(parts) + ". Positions after the first can become sinks "
                   "when the input gives them a reason (a delimiter, a repeated token).")
    forms = {k: v["formation_layer"] for k, v in kinds.items()}
    known = [v for v in forms.values() if v is not None]
    if known:
        first = min(known)
        where = ", ".join(f"layer {v} on {k}" if v is not None else f"never on {k}" for k, v in forms.items())
        out.append(f"The sink forms early: at least half the heads of a layer sink on token 0 from {where}. "
                   f"Layers before {first} still spread their attention over the input.")
        k0 = next(k for k, v in forms.items() if v is not None)
        share = kinds[k0].get("sink_ratio_first_by_layer") or []
        layers = kinds[k0].get("layers") or list(range(len(share)))
        gaps = [l for l, r in zip(layers, share) if l > forms[k0] and r < 0.5]
        if gaps:
            out.append(f"After it forms, the sink is not used everywhere: on {k0}, fewer than half the heads sink "
                       f"on token 0 in layer(s) {_layers(gaps)}.")
    else:
        out.append("No layer has half of its heads on token 0: the sink, where present, is confined to a few heads.")
    return out


def explain_drains(s: dict[str, Any]) -> list[str]:
    """Paragraphs for the value-drain / residual-peak / massive-activation section.

    ``s``: ``residual_peak`` {layer, ratio}, ``peak_from_layer`` (first layer with ratio >= 10, or None),
    ``value_ratio_median`` (median over layers of token 0's value norm / median token's), ``drain_layers``
    (number of layers with ratio < 0.5), ``n_layers``, ``massive_dims`` (list of {dim, max_value, layers}),
    ``massive_max`` (largest |activation|), ``massive_median`` (median |activation| at that layer).
    """
    out = []
    pk = s.get("residual_peak")
    if pk and pk["ratio"] >= 10:
        start = s.get("peak_from_layer")
        out.append(f"Residual-state peak: after layer {pk['layer']} the first token's hidden state is "
                   f"{pk['ratio']:.0f} times longer than the median token's"
                   + (f", and it is at least 10 times longer from layer {start} on." if start is not None else "."))
    elif pk:
        out.append(f"No strong residual-state peak: the first token's hidden state is at most {pk['ratio']:.1f} "
                   "times the median token's.")
    vr = s.get("value_ratio_median")
    if vr is not None:
        if vr < 0.5:
            out.append(f"Value-state drain: in {s['drain_layers']} of {s['n_layers']} layers the first token's value "
                       f"vectors are less than half the median token's (median ratio {vr:.2f}), so attention parked "
                       "on it adds almost nothing to the output: this is how a head does nothing.")
        else:
            out.append(f"No clear value-state drain (median ratio of value norms {vr:.2f}): attention on the first "
                       "token still writes its value into the output.")
    by = s.get("by_kind") or {}
    ref = by.get(s.get("input", ""))
    for kind, b in by.items():
        if ref is None or kind == s.get("input") or b["median_other_norm"] < 5 * ref["median_other_norm"]:
            continue
        out.append(f"On {kind} inputs the ordinary tokens carry the peak too: at layer {b['layer']} their median "
                   f"residual norm is {b['median_other_norm']:.0f} against {ref['median_other_norm']:.0f} on "
                   f"{s['input']} (token 0: {b['first_norm']:.0f}), so token 0 no longer stands out "
                   f"(peak ratio {b['residual_peak']:.1f}). The copies behave like first tokens.")
    dims = s.get("massive_dims") or []
    if dims:
        d0 = dims[0]
        out.append(f"Massive activations: hidden dimension {d0['dim']} reaches |x| = {d0['max_value']:.0f} "
                   f"(median |x| {s.get('massive_median', float('nan')):.2g}) in {d0['layers']} layers"
                   + (f"; also dimension(s) {', '.join(str(d['dim']) for d in dims[1:4])}" if len(dims) > 1 else "")
                   + ". A few fixed coordinates carry the residual peak, as Sun et al. report for large models.")
    else:
        out.append("No massive activations (no entry above 100 and 1000 times the median) were found.")
    return out


def explain_dormant(s: dict[str, Any]) -> list[str]:
    """Paragraphs for the active/dormant section; ``s`` is `DormancyReport.summary()` plus ``top`` (rows of the
    most domain-dependent heads)."""
    n = s["n_heads"]
    out = [f"With a head called dormant when at least {s['threshold']} of its attention goes to token 0: "
           f"{s['n_dormant']} of {n} heads are dormant on every domain, {s['n_active']} are active on every "
           f"domain and {s['n_switching']} switch between the two depending on the input."]
    share = s["dormant_share"]
    hi, lo = max(share, key=share.get), min(share, key=share.get)
    out.append(f"Most heads sleep on {hi} ({_pct(share[hi])} dormant) and fewest on {lo} ({_pct(share[lo])}).")
    top = s.get("top") or []
    if top and top[0]["dependence"] >= 0.3:
        t = top[0]
        out.append(f"The most domain-dependent head is layer {t['layer']} head {t['head']}: its attention on "
                   f"token 0 is {t['alpha0_' + t['most_dormant_on']]:.2f} on {t['most_dormant_on']} but "
                   f"{t['alpha0_' + t['most_active_on']]:.2f} on {t['most_active_on']}, and its output norm "
                   f"changes {t['out_norm_ratio']:.1f}x. Like Guo et al.'s layer-16 head in Llama-2, it wakes up "
                   f"for one kind of input and parks on the sink otherwise.")
    else:
        out.append("No head changes its behaviour strongly between domains (largest change of alpha_0 "
                   f"{top[0]['dependence'] if top else 0:.2f}): dormancy here is a fixed property of each head.")
    return out


def explain_repetition(s: dict[str, Any]) -> list[str]:
    """Paragraphs for the repetition section: ``rates`` {length: rate}, optional ``circuit`` (with a
    ``description``), ``patch`` ({method, description, n, words, still_diverged (None: nothing to stop)}),
    ``patch_note`` and ``harm`` (`sinkscope.report.repetition.harm_where_it_acts`)."""
    rates = {int(k): v for k, v in s["rates"].items()}
    out = []
    if rates:
        lo_n, hi_n = min(rates), max(rates)
        if max(rates.values()) == 0:
            out.append(f"No continuation diverged for runs of {lo_n} to {hi_n} copies: at these lengths the model "
                       "keeps repeating, so its first-token detector is not yet fooled by the run.")
        else:
            first = min(n for n, r in rates.items() if r > 0)
            out.append(f"Divergence starts at {first} copies and reaches {_pct(rates[hi_n])} of the words at {hi_n}: "
                       "long runs of one token look like fresh first tokens to the model, become extra sinks, and "
                       "the model leaves the repetition, often emitting unrelated text.")
    circ = s.get("circuit")
    if circ:
        out.append(f"The sink circuit: {circ['description']}")
    p = s.get("patch")
    if p and p.get("still_diverged") is not None:
        k, n_w = int(p["still_diverged"]), len(p["words"])
        verdict = ("stops" if k == 0 else "does not stop" if k == n_w else "reduces")
        out.append(f"The shipped default patch (`{p.get('method', 'dedup')}`: {p.get('description')}) {verdict} the "
                   f"divergence at {p['n']} copies: of the {n_w} word(s) that diverged without it "
                   f"({', '.join(p['words'])}), {k} still diverge with it.")
    elif s.get("patch_note"):
        out.append(f"Patch: {s['patch_note']}.")
    h = s.get("harm")
    if h is not None:
        opened, total, measured = len(h["gate_opens"]), h["documents"], h["measured"]
        where = (f"its repetition gate opens on {opened} of the {total} shipped {h['set'].upper()} "
                 "natural-repetition documents (on the others, and on ordinary prose, the patched model computes "
                 "exactly the original)")
        rows = {r["family"]: r for r in h.get("rows", [])}
        if measured and "all" in rows:
            a = rows["all"]
            worst = max((r for f, r in rows.items() if f != "all"), key=lambda r: r["kl_all"], default=a)
            out.append(f"Harm of the `{h.get('method', 'dedup')}` patch, measured where it acts: {where}. "
                       f"On {len(measured)} of them "
                       f"({', '.join(measured)}) the KL(original || patched) is {a['kl_inside']:.2g} nats/token "
                       f"inside the repeated stretch, {a['kl_after']:.2g} after it and {a['kl_all']:.2g} overall "
                       f"(largest family: {worst['family']}, {worst['kl_all']:.2g}); perplexity changes by "
                       f"{100 * a['ppl_change']:+.2f}%."
                       + (" Below 0.01 nats/token even where it acts: the patch barely changes ordinary text "
                          "that repeats." if a["kl_all"] < 0.01 else
                          " At or above 0.01 nats/token where it acts: the patch visibly changes the predictions on "
                          "text that repeats (the design target, a mean below 0.01 over whole document sets, counts "
                          "the documents it leaves alone as 0; this mean is over the documents where it acts)."))
        else:
            name = f"Harm of the `{h.get('method', 'dedup')}` patch"
            out.append(f"{name}: {where}, so it cannot change this model's predictions on them (KL 0 by "
                       "construction)." if not opened else f"{name}: {where}; none was measured (harm_documents 0).")
    return out


def explain_kv(s: dict[str, Any]) -> list[str]:
    """Paragraphs for the KV heads section; ``s`` is its data: ``n_full``, ``n_heads``, ``budget``, ``length``,
    ``n_sink``, ``window``, ``criterion``, ``measured_kl``, ``line`` (rows with ``budget``, ``n_full``, ``kl``),
    ``full_layers``, ``full_share_of_distant``, ``full_in_top_distant``, ``distant_full_mean`` /
    ``distant_streaming_mean``, ``seconds``."""
    n, total, kl = s["n_full"], s["n_heads"], s["measured_kl"]
    out = [f"At {_pct(s['budget'])} of the dense cache's bytes ({s['length']} tokens), {n} of {total} kv heads keep "
           f"every token and the other {total - n} keep {s['n_sink']} sinks + {s['window']} recent tokens; the "
           f"held-out KL to the dense model is {kl:.3g} nats/token"
           + (" (within the 0.05 nats/token the KV issue targets: the streaming heads lose little)." if kl <= 0.05
              else " (above 0.05 nats/token, the KV issue's target: at this length and budget the dropped distant "
                   "attention changes the predictions noticeably).")]
    if n:
        layers = s["full_layers"]
        where = (f"layer {layers[0]}" if len(layers) == 1 else
                 f"{len(layers)} layers ({', '.join(map(str, layers[:8]))}{', ...' if len(layers) > 8 else ''})")
        sf, ss = s.get("distant_full_mean"), s.get("distant_streaming_mean")
        contrast = (f"; the full heads' distant mass averages {sf:.2f} against {ss:.2f} for the streaming heads"
                    if sf is not None and ss is not None else "")
        out.append(f"The full heads sit in {where}{contrast}; they hold {_pct(s['full_share_of_distant'])} of all "
                   f"distant mass. Ranked by {s['criterion']}, {s['full_in_top_distant']} of the {n} are also among "
                   f"the {n} heads with the most distant mass"
                   + (": the two rankings agree." if s["full_in_top_distant"] == n else
                      ": the ranking also weighs how much a head's dropped keys change the layer's output."))
    line = [r for r in s.get("line", []) if r.get("kl") is not None]
    if len(line) > 1:
        lo, hi = line[0], line[-1]
        pts = ", ".join(f"{100 * r['budget']:g}%: {r['kl']:.3g}" for r in line)
        trend = ("falls" if hi["kl"] < lo["kl"] else "does not fall")
        out.append(f"The quality line (KL by budget: {pts}) {trend} as full heads are added"
                   + (f"; at {100 * lo['budget']:g}% no head keeps the full cache (uniform sinks + window)."
                      if lo["n_full"] == 0 else "."))
    out.append(f"Calibrating took {s['seconds']:.0f} s; `sinkscope kv calibrate` writes the policy for "
               "`sinkscope kv generate`.")
    return out
