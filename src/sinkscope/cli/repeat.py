"""`sinkscope repeat ...`: divergence scan, sink-circuit localisation, cluster attack, patch and its evaluation."""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sinkscope.cli.common import DEVICE_OPTION, DTYPE_OPTION, REVISION_OPTION, TRUST_OPTION
from sinkscope.errors import InputError
from sinkscope.models.load import DEFAULT_MODEL

#: defaults of the de-duplication: the design chosen on DEV words and the DEV harm set by the rule in
#: experiments/repeat_chain.design.py (docs/repetition.md): repeated keys counted once, only by queries inside the
#: repetition (text after it attends normally)
DEDUP_KEEP = 1
DEDUP_QUERIES = "gated"
DEDUP_REACH = 0

app = typer.Typer(help="The repeated-token phenomenon: detect divergence, find the sink circuit, attack, patch.",
                  no_args_is_help=True, add_completion=False)
console = Console(stderr=True)


@contextmanager
def _progress(label: str, total: int) -> Iterator[Any]:
    """A progress bar on a terminal; plain lines (``label [done/total] what, elapsed``) when stderr is a file, so
    background runs show progress in their log. Yields ``tick(done, total=None, what=None)``."""
    tty = sys.stderr.isatty()
    t0 = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not tty) as p:
        task = p.add_task(label, total=total)

        def tick(done: int, tot: int | None = None, what: str | None = None) -> None:
            p.update(task, completed=done, total=tot or total,
                     description=f"{label}: {what}" if what else label)
            if not tty and what:
                print(f"{label} [{done}/{tot or total}] {what} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
                      flush=True)

        yield tick


def _write_json(path: Path, obj: Any) -> None:
    from sinkscope.io import write_json_atomic

    write_json_atomic(path, obj)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    from sinkscope.io import write_csv_atomic

    flat = [{k: v for k, v in r.items() if not isinstance(v, (dict, list))} for r in rows]
    keys = list(dict.fromkeys(k for r in flat for k in r))  # rows may differ in their columns
    write_csv_atomic(path, [{k: r.get(k, "") for k in keys} for r in flat])


def _save_fig(path: Path, fig: Any) -> None:
    import matplotlib.pyplot as plt

    from sinkscope.io import save_figure_atomic

    save_figure_atomic(path, fig)
    plt.close(fig)


def _words(tokenizer: Any, words_file: Optional[Path], words: Optional[str], n_words: Optional[int],
           default: list[str]) -> list[str]:
    from sinkscope.tasks.repeated_tokens import read_words, run_token_id

    if words_file is not None:
        ws = read_words(words_file)
    elif words is not None:
        ws = [w.strip() for w in words.split(",") if w.strip()]
        if not ws:
            raise InputError("--words: give at least one word (comma-separated)")
    else:
        ws = list(default)
    if not ws:
        raise InputError("no words to use")
    if n_words is not None:
        if n_words < 1:
            raise InputError(f"--n-words must be a positive integer, got {n_words}")
        ws = ws[:n_words]
    for w in ws:
        run_token_id(tokenizer, w)
    return ws


def _lengths(spec: str) -> list[int]:
    from sinkscope.tasks.repeated_tokens import parse_lengths

    return parse_lengths(spec)


def _load(model: str, device: str = "cpu", dtype: str = "float32", revision: Optional[str] = None,
          trust_remote_code: bool = False) -> tuple[Any, Any]:
    from sinkscope.cli.common import load_cli_model

    return load_cli_model(model, device=device, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code)


def _pinned(patch: Any, revision: Optional[str]) -> Any:
    """``patch`` with the hub revision its base model was measured at (restored by `sinkscope.load_model`)."""
    if revision is None:
        return patch
    import dataclasses

    return dataclasses.replace(patch, meta={**patch.meta, "base_revision": revision})


def _default_corpus() -> Path:
    from sinkscope.corpora import corpus_path

    return corpus_path()


def _corpus_text(corpus: Optional[Path]) -> str:
    from sinkscope.repetition.corpus import read_corpus

    return read_corpus(corpus)


# ------------------------------------------------------------------------------------------------------------------
@app.command("scan")
def scan(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (re-running resumes finished cells)"),
    words_file: Optional[Path] = typer.Option(None, "--words-file", help="one word per line"),
    words: Optional[str] = typer.Option(None, "--words", help="comma-separated words (default: built-in list)"),
    n_words: Optional[int] = typer.Option(None, "--n-words", help="use only the first K words"),
    lengths: str = typer.Option("2..1024", "--lengths", help="'LO..HI' (powers of two) or '64,512,1024'"),
    forms: str = typer.Option("instruct", "--forms", help="comma list: bare, instruct, garak1, garak3, garak40, "
                                                          "garak-word1"),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens"),
    batch_size: int = typer.Option(8, "--batch-size", help="rows per generate call (prompts of equal length)"),
    sinkness_words: int = typer.Option(2, "--sinkness-words", help="first K words also get the layer-by-layer "
                                                                   "sinkness pass (-1: all)"),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    revision: Optional[str] = REVISION_OPTION,
    trust_remote_code: bool = TRUST_OPTION,
) -> None:
    """Greedy continuations of words x lengths x prompt forms: divergence verdicts, what was emitted instead, and the
    sinkness of the repeated tokens per layer. Writes cells.jsonl/cells.csv, summary.json/csv and plots."""
    from sinkscope.io import check_output_dir
    from sinkscope.repetition.scan import ScanPlan, scan_repetition, summarise
    from sinkscope.tasks.repeated_tokens import default_words
    from sinkscope.viz.repetition import divergence_vs_length, similarity_vs_position

    out = check_output_dir(out)
    ns, form_list = _lengths(lengths), _forms(forms)
    m, tok = _load(model, device, dtype, revision, trust_remote_code)
    ws = _words(tok, words_file, words, n_words, default_words(tok))
    plan = ScanPlan(ws, ns, form_list, max_new_tokens, batch_size, None if sinkness_words < 0 else ws[:sinkness_words])
    t0 = time.perf_counter()
    with _progress("scan", len(ws) * len(plan.lengths) * len(plan.forms)) as tick:
        state = {"what": None}
        cells = scan_repetition(m, tok, plan, out, on_cells=lambda d, t: tick(d, t, state["what"]),
                                on_batch=lambda what: state.__setitem__("what", what))
    summary = summarise(cells)
    _write_csv(out / "cells.csv", cells)
    _write_csv(out / "summary.csv", summary)
    _write_json(out / "summary.json", {"model": model, "plan": plan.__dict__, "summary": summary,
                                       "elapsed_s": time.perf_counter() - t0})
    _save_fig(out / "divergence_vs_length.png", divergence_vs_length(summary))
    with_s = [c for c in cells if "sinkness" in c]
    for form in plan.forms:
        cs = [c for c in with_s if c["form"] == form]
        if cs:
            _save_fig(out / f"similarity_{form}.png", similarity_vs_position(max(cs, key=lambda c: c["n"])))
    for r in summary:
        print(f"{r['form']:>12} N={r['n']:>5}: {r['diverged']:>3}/{r['words']} diverged ({r['rate']:.0%})")


# ------------------------------------------------------------------------------------------------------------------
def _run_circuit(m: Any, tok: Any, out: Path, corpus: Optional[Path], run_words: list[str], n: int, mode: str,
                 heads: bool, per_layer: int, max_new_tokens: int, batch_size: int, *,
                 exact: Optional[int] = None, exhaustive: bool = False) -> tuple[Any, Any]:
    from sinkscope.repetition.activations import neuron_stats, save_neuron_stats
    from sinkscope.repetition.circuit import CIRCUIT_STAGES, DEFAULT_EXACT, localise_sink_circuit
    from sinkscope.repetition.corpus import calibration_sequences, text_chunks
    from sinkscope.viz.repetition import circuit_effects

    text = _corpus_text(corpus)
    out.mkdir(parents=True, exist_ok=True)
    tty = sys.stderr.isatty()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[left]}"),
                  TimeElapsedColumn(), console=console, disable=not tty) as bar:
        task = bar.add_task("circuit", total=1, left="")
        stage_now = [""]

        def tick(stage: str, done: int, total: int) -> None:
            label = CIRCUIT_STAGES.get(stage, stage)
            if stage != stage_now[0]:
                stage_now[0] = stage
                if not tty:
                    console.print(f"circuit: {label} ({total})")
            bar.update(task, description=f"circuit: {label}", completed=done, total=total, left=f"{total - done} left")

        tick("stats", 0, 1)
        stats = neuron_stats(m, calibration_sequences(tok, text), batch_size=batch_size)
        save_neuron_stats(stats, str(out / "neuron_stats.pt"))
        tick("stats", 1, 1)
        seqs = text_chunks(tok, text, n=8, length=32, offset=10)
        circ = localise_sink_circuit(m, tok, seqs, stats, run_words=run_words, run_length=n, mode=mode, heads=heads,
                                     per_layer=per_layer, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                     exact=None if exhaustive else (exact or DEFAULT_EXACT), progress=tick)
    d = circ.to_json()
    d["settings"]["corpus"] = str(corpus) if corpus else "shipped WikiText-2"
    _write_json(out / "circuit.json", d)
    _write_csv(out / "circuit.csv", circ.rows())
    _save_fig(out / "circuit.png", circuit_effects(d["components"]))
    return circ, stats


@app.command("circuit")
def circuit(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m"),
    out: Path = typer.Option(..., "--out", "-o"),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="ordinary text (default: the shipped WikiText-2 text)"),
    words: Optional[str] = typer.Option(None, "--words", help="run words (default: 8 of the patch-building words)"),
    n: int = typer.Option(512, "--n", help="repetitions in the runs measured for firing"),
    mode: str = typer.Option("zero", "--mode", help="zero | mean ablation at token 0"),
    heads: bool = typer.Option(True, "--heads/--no-heads", help="also ablate every attention head"),
    per_layer: int = typer.Option(8, "--per-layer", help="first-token neuron candidates per layer"),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens"),
    batch_size: int = typer.Option(8, "--batch-size"),
    exact: Optional[int] = typer.Option(None, "--exact", help="pruned search: candidates of linear layers ablated "
                                                              "exactly, by attribution estimate (default 32)"),
    exhaustive: bool = typer.Option(False, "--exhaustive", help="ablate every candidate exactly (no attribution "
                                                                "pruning)"),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    revision: Optional[str] = REVISION_OPTION,
    trust_remote_code: bool = TRUST_OPTION,
) -> None:
    """Find the heads and neurons that create token 0's sink (ablation at token 0, ranked by effect) and which of
    them fire on long repeated runs and before divergence. With more candidates than --exact, only the candidates
    of layers whose joint ablation the attribution estimates miss, plus the --exact best-estimated others, are
    ablated (settings.search says so); --exhaustive ablates all. Writes circuit.json/csv, circuit.png."""
    from sinkscope.tasks.repeated_tokens import PATCH_WORDS

    if exact is not None and exact < 1:
        raise InputError(f"--exact must be a positive number of candidates, got {exact}")
    m, tok = _load(model, device, dtype, revision, trust_remote_code)
    ws = _words(tok, None, words, None, list(PATCH_WORDS[:8]))
    t0 = time.perf_counter()
    circ, _ = _run_circuit(m, tok, out, corpus, ws, n, mode, heads, per_layer, max_new_tokens, batch_size,
                           exact=exact, exhaustive=exhaustive)
    st = circ.settings
    print(f"search: {st['search']} ({st['ablated_exactly']} of {st['candidates']} candidates ablated exactly"
          + (f"; nonlinear layer groups: {', '.join(st['nonlinear_groups']) or 'none'}" if st["search"] != "exhaustive"
             else "") + f"), {time.perf_counter() - t0:.0f} s")
    print(f"{'rank':>4} {'component':>10} {'effect':>7} {'resid':>7} {'attn':>7} {'fire_run':>8} {'fire_div':>8}")
    for i, c in enumerate(circ.components[:15]):
        name = f"L{c.layer}.{'N' if c.kind == 'neuron' else 'H'}{c.index}"
        if c.exact:
            print(f"{i + 1:>4} {name:>10} {c.effect:7.3f} {c.effect_residual:7.3f} {c.effect_attention:7.3f} "
                  f"{c.fire_run:8.2f} {c.fire_diverged:8.2f}")
        else:
            print(f"{i + 1:>4} {name:>10} ~{c.estimate:6.3f} (attribution estimate, not ablated)")


# ------------------------------------------------------------------------------------------------------------------
@app.command("patch")
def patch(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m"),
    save: Path = typer.Option(..., "--save", help="directory for the patched model (manifest)"),
    method: str = typer.Option("dedup", "--method", help="dedup (ours, default: repeated keys counted once by "
                                                         "queries inside a repetition) | direction (adds a gated "
                                                         "clamp of the first-token direction) | neurons "
                                                         "(conditional clamp of circuit neurons) | yona (the "
                                                         "paper's patch: the sink layer's sink neurons, every "
                                                         "position but the first)"),
    dedup: bool = typer.Option(True, "--dedup/--no-dedup", help="direction: also count repeated keys once in "
                                                                "attention"),
    dedup_keep: int = typer.Option(DEDUP_KEEP, "--dedup-keep", help="direction/dedup: repeated keys keep the "
                                                                    "weight of this many keys (1: counted once)"),
    dedup_queries: str = typer.Option(DEDUP_QUERIES, "--dedup-queries", help="direction/dedup: gated (only "
                                                                             "queries inside a repetition "
                                                                             "discount it) | all"),
    dedup_reach: int = typer.Option(DEDUP_REACH, "--dedup-reach", help="direction/dedup with gated queries: "
                                                                       "queries this many tokens after a "
                                                                       "repetition still discount it"),
    circuit_dir: Optional[Path] = typer.Option(None, "--circuit", help="neurons: output of `repeat circuit` "
                                                                       "(else run it)"),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="ordinary text for the ordinary ranges"),
    words: Optional[str] = typer.Option(None, "--words", help="patch-building words (default: built-in)"),
    n: Optional[int] = typer.Option(None, "--n", help="copies in the measured runs (direction: 1024, neurons: 512)"),
    layer: Optional[int] = typer.Option(None, "--layer", help="direction: force the layer (default: chosen from "
                                                              "the runs)"),
    window: int = typer.Option(32, "--window", help="direction: repetition gate window (tokens)"),
    min_cos: float = typer.Option(0.8, "--min-cos", help="direction: gate opens at this mean embedding cosine"),
    fire_min: float = typer.Option(0.2, "--fire-min", help="neurons: keep neurons above range on this share of "
                                                           "run positions"),
    margin: float = typer.Option(1.0, "--margin", help="neurons: threshold = margin x ordinary-text max"),
    batch_size: int = typer.Option(8, "--batch-size"),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    revision: Optional[str] = REVISION_OPTION,
    trust_remote_code: bool = TRUST_OPTION,
) -> None:
    """Build the sink patch and save it; `sinkscope.load_model(DIR)` restores the base model with the patch active.

    dedup (default, ours): inside a repetition (the gate), the repeated keys share one key's attention, for
    queries inside the repetition only (--dedup-queries gated): no measurement needed. direction: adds the
    first-token direction of the layer where long runs stand out most, clamped back to its ordinary median inside
    repetitions. neurons: the circuit's first-token neurons that fire on runs, clamped where they exceed their
    ordinary range. yona: Yona et al.'s published patch (sink layer and neurons by their rules, every position but
    the first)."""
    from sinkscope.interventions.patch import build_patch, save_patch
    from sinkscope.tasks.repeated_tokens import PATCH_WORDS

    if method not in ("direction", "dedup", "neurons", "yona"):
        raise InputError(f"unknown --method {method!r}; choose direction, dedup, neurons or yona")
    dedup_opts = {"dedup_keep": dedup_keep, "dedup_queries": dedup_queries, "dedup_reach": dedup_reach}
    if method == "dedup":
        import dataclasses

        from sinkscope.repetition.direction import dedup_patch

        _load(model, device, dtype, revision, trust_remote_code)  # fails early on a bad model spec
        p = dataclasses.replace(dedup_patch(base_model=model, window=window, min_cos=min_cos),
                                **dedup_opts)
        save_patch(_pinned(p, revision), save)
        print(f"saved patch ({p.describe()}) to {save}")
        return
    m, tok = _load(model, device, dtype, revision, trust_remote_code)
    if method == "yona":
        from sinkscope.repetition.corpus import calibration_sequences
        from sinkscope.repetition.yona import yona_patch

        ws = _words(tok, None, words, None, list(PATCH_WORDS))
        p, report = yona_patch(m, tok, calibration_sequences(tok, _corpus_text(corpus)), ws,
                               base_model=model, batch_size=batch_size)
        save_patch(_pinned(p, revision), save)
        _write_json(save / "yona_report.json", report)
        sl = report["sink_layer"]
        print(f"saved patch ({p.describe()}) to {save}")
        print(f"  sink layer {sl['layer']} (first {sl['half']} layers: MLP output norm at a one-token input > "
              f"{sl['threshold']:.1f}); m_l = {[round(x, 1) for x in sl['mlp_norm']]}")
        for n in report["neurons"]:
            print(f"  L{sl['layer']}.N{n['index']}: score {n['score']:.1f}, |a| at token 0 {n['first_activation']:.1f},"
                  f" ablation removes {n['peak_drop']:.1%} of the first token's norm peak"
                  f"{' (kept)' if n['kept'] else ''}")
        return
    if method == "direction":
        from sinkscope.repetition.corpus import calibration_sequences
        from sinkscope.repetition.direction import build_direction_patch

        ws = _words(tok, None, words, None, list(PATCH_WORDS[:8]))
        with _progress("measure directions and runs", 1) as tick:
            p, report = build_direction_patch(m, tok, calibration_sequences(tok, _corpus_text(corpus)), ws,
                                              base_model=model, n=n or 1024, layer=layer, window=window,
                                              min_cos=min_cos, attention_dedup=dedup, batch_size=batch_size)
            if dedup:
                import dataclasses

                p = dataclasses.replace(p, **dedup_opts)
            tick(1)
        save_patch(_pinned(p, revision), save)
        _write_json(save / "direction_report.json", report.__dict__)
        print(f"saved patch ({p.describe()}) to {save}")
        print(f"  layer scores (runs beyond ordinary text, in ordinary spreads): "
              f"{[round(x, 1) for x in report.scores]}")
        r = p.directions[0]
        print(f"  layer {r.layer}: clamp above {r.threshold:.1f} to {r.value:.1f} (first token "
              f"{report.ordinary['first'][r.layer]:.1f}, runs {p.meta['run_projection_mean']:.1f})")
        return
    from sinkscope.repetition.activations import load_neuron_stats
    from sinkscope.repetition.circuit import SinkCircuit

    if circuit_dir is not None:
        cj, sp = circuit_dir / "circuit.json", circuit_dir / "neuron_stats.pt"
        if not cj.is_file() or not sp.is_file():
            raise InputError(f"{circuit_dir} has no circuit.json + neuron_stats.pt (run `repeat circuit` first)")
        circ, stats = SinkCircuit.from_json(json.loads(cj.read_text())), load_neuron_stats(str(sp))
    else:
        ws = _words(tok, None, words, None, list(PATCH_WORDS[:8]))
        circ, stats = _run_circuit(m, tok, save / "circuit", corpus, ws, n or 512, "zero", False, 8, 24, batch_size)
    p = build_patch(circ, stats, base_model=model, fire_min=fire_min, margin=margin)
    save_patch(_pinned(p, revision), save)
    print(f"saved patch ({p.describe()}) to {save}")
    for r in p.rules:
        print(f"  layer {r.layer}: neurons {r.index} thresholds {[round(t, 2) for t in r.threshold]}")


# ------------------------------------------------------------------------------------------------------------------
def _variant_names(dirs: list[Path]) -> list[str]:
    """One name per patch directory (its folder name; numbered when two share a name)."""
    from sinkscope.repetition.protocol import NO_PATCH

    names: list[str] = []
    for d in dirs:
        base = d.resolve().name or "patch"
        name, k = base, 2
        while name in names or name == NO_PATCH:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def _forms(spec: str) -> list[str]:
    from sinkscope.repetition.protocol import PROTOCOL_FORMS
    from sinkscope.tasks.repeated_tokens import check_form

    if spec.strip() == "protocol":
        return list(PROTOCOL_FORMS)
    forms = [f.strip() for f in spec.split(",") if f.strip()]
    if not forms:
        raise InputError("--forms: give at least one prompt form (or 'protocol')")
    for f in forms:
        check_form(f)
    return forms


def _harm_sets(spec: str) -> dict[str, Any]:
    from sinkscope.repetition.harm import load_harm_set

    names = [h.strip() for h in spec.split(",") if h.strip()]
    if names == ["none"]:
        return {}
    if not names:
        raise InputError("--harm-sets: give dev, eval, a directory, or none")
    return {Path(n).name if n not in ("dev", "eval") else n: load_harm_set(n) for n in names}


@app.command("evaluate")
def evaluate(
    patch_dirs: list[Path] = typer.Option(..., "--patch", help="a directory saved by `repeat patch` (repeat the "
                                                                "option to compare several patches)"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (re-running resumes finished cells)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="load the base model from here instead of "
                                                                    "the spec in the manifest (same weights, "
                                                                    "another location, e.g. a .gguf on a GPU box)"),
    word_set: str = typer.Option("eval", "--word-set", help="eval (words no design choice has seen) | dev"),
    words_file: Optional[Path] = typer.Option(None, "--words-file", help="one word per line (instead of a set)"),
    words: Optional[str] = typer.Option(None, "--words", help="comma-separated words (instead of a set)"),
    n_words: Optional[int] = typer.Option(None, "--n-words", help="use only the first K words"),
    forms: str = typer.Option("instruct", "--forms", help="comma list of prompt forms, or 'protocol' (instruct, "
                                                          "the garak forms, bare, repeat-colon)"),
    lengths: str = typer.Option("1024", "--lengths", help="repetition lengths; the protocol: 256,512,1024,2048"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="answer length (the protocol: >= 128)"),
    harm_sets: str = typer.Option("eval", "--harm-sets", help="natural-repetition documents: eval, dev, both "
                                                              "(dev,eval), a directory, or none"),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="ordinary text for KL / perplexity (default: the "
                                                                 "shipped WikiText-2 validation text)"),
    text: bool = typer.Option(True, "--text/--no-text", help="measure KL / perplexity on text and harm sets"),
    divergence: bool = typer.Option(True, "--divergence/--no-divergence", help="run the divergence grid"),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    revision: Optional[str] = REVISION_OPTION,
    trust_remote_code: bool = TRUST_OPTION,
    batch_size: int = typer.Option(8, "--batch-size", help="rows per generate call (prompts of equal length)"),
) -> None:
    """Divergence with and without each patch (words x forms x N, greedy answers judged whole: repeats, stopped,
    diverged), and what each patch does to text: KL / perplexity / Sink_0 on WikiText and, per family, on the
    natural-repetition documents (gate openings, KL inside and after the repeated stretch, NLL after it, top-1
    agreement). Writes cells.jsonl (resumable), summary.csv, harm_<set>.csv, evaluation.json."""
    from sinkscope.interventions.patch import read_patch
    from sinkscope.io import check_output_dir
    from sinkscope.repetition.protocol import NO_PATCH, EvalPlan, run_protocol, summarise_cells
    from sinkscope.repetition.words import word_set as named_words

    out = check_output_dir(out)
    if not patch_dirs:
        raise InputError("--patch: give at least one patch directory")
    patches = [read_patch(d) for d in patch_dirs]
    bases = {p.base_model for p in patches}
    if len(bases) > 1:
        raise InputError(f"the patches were built on different base models: {', '.join(sorted(bases))}")
    names = _variant_names(list(patch_dirs))
    form_list, ns = _forms(forms), _lengths(lengths)
    hsets = _harm_sets(harm_sets) if text else {}
    text_src = _corpus_text(corpus if corpus is not None else _default_corpus())
    m, tok = _load(model or patches[0].base_model, device, dtype, revision, trust_remote_code)
    if words is not None or words_file is not None:
        ws = _words(tok, words_file, words, n_words, [])
    else:
        ws = named_words(word_set, tok)
        if n_words is not None:
            ws = _words(tok, None, ",".join(ws), n_words, [])
    plan = EvalPlan(ws, form_list, ns, [NO_PATCH, *names], max_new_tokens, batch_size)
    from sinkscope.models.adapters import get_adapter

    if divergence:
        plan.validate(tok, get_adapter(m).max_positions)
    from sinkscope.io import ensure_output_dir

    ensure_output_dir(out)
    by_name: dict[str, Any] = {NO_PATCH: None, **dict(zip(names, patches))}
    result: dict[str, Any] = {"settings": {"patches": {n: str(d) for n, d in zip(names, patch_dirs)},
                                           "describe": {n: p.describe() for n, p in zip(names, patches)},
                                           "base_model": patches[0].base_model, "model": model, "words": ws,
                                           "word_set": None if (words or words_file) else word_set,
                                           "forms": form_list, "lengths": ns, "max_new_tokens": max_new_tokens,
                                           "protocol": max_new_tokens >= 128, "device": device, "dtype": dtype,
                                           "batch_size": batch_size,
                                           "corpus": str(corpus) if corpus else "shipped wikitext2-valid"}}
    t0 = time.perf_counter()
    if divergence:
        print(f"divergence: {plan.n_cells} answers ({len(ws)} words x {len(form_list)} forms x {len(ns)} lengths x "
              f"{len(plan.variants)} variants), {max_new_tokens} new tokens, up to {batch_size} equal-length rows "
              "per batch", flush=True)
        with _progress("evaluate", plan.n_cells) as tick:
            cells = run_protocol(m, tok, plan, by_name, out, on_progress=lambda d, t, what: tick(d, t, what))
        summary = summarise_cells(cells)
        _write_csv(out / "cells.csv", cells)
        _write_csv(out / "summary.csv", summary)
        result["summary"] = summary
        for r in summary:
            extra = ""
            if "relative_reduction" in r:
                rel = r["relative_reduction"]
                extra = (f", unpatched {r['rate_unpatched']:.0%}, relative reduction "
                         f"{'n/a' if rel != rel else format(rel, '.0%')}")  # NaN: nothing diverged unpatched
            print(f"{r['variant']:>16} {r['form']:>12} N={r['n']:>5}: diverged {r['diverged']:>3}/{r['words']} "
                  f"({r['rate']:.0%}), stopped {r['stopped']}, repeats {r['repeats']}, loops {r['loops']}{extra}")
    if text:
        from sinkscope.repetition.corpus import heldout_sequences
        from sinkscope.repetition.evaluate import side_effects

        seqs = heldout_sequences(tok, text_src)
        result["side_effects"] = side_effects(m, tok, dict(zip(names, patches)), seqs, hsets, batch_size=batch_size)
        for name in names:
            se = result["side_effects"][name]
            t = se["text"]
            print(f"{name}: WikiText KL {t['kl']:.2e} nats/token (max {t['kl_max']:.2e}), perplexity "
                  f"{t['ppl_original']:.3f} -> {t['ppl_patched']:.3f} ({t['ppl_change']:+.3%}); Sink_0 "
                  f"{se['sink_ratio_before']:.3f} -> {se['sink_ratio_after']:.3f}")
            for hs, h in se["harm"].items():
                _write_csv(out / f"harm_{hs}_{name}.csv", h["families"])
                _write_csv(out / f"harm_{hs}_{name}_documents.csv", h["documents"])
                for r in h["families"]:
                    print(f"  harm {hs:>4} {r['family']:>9}: gate opened {r['gate_opened']}/{r['documents']}, KL "
                          f"inside {r['kl_inside']:.4f} after {r['kl_after']:.4f} all {r['kl_all']:.4f}, NLL after "
                          f"{r['nll_after_original']:.3f} -> {r['nll_after_patched']:.3f}, perplexity "
                          f"{r['ppl_change']:+.2%}, top-1 after {r['top1_after']:.3f}")
    result["elapsed_s"] = time.perf_counter() - t0
    _write_json(out / "evaluation.json", result)


# ------------------------------------------------------------------------------------------------------------------
@app.command("cluster")
def cluster(
    patch_dir: Path = typer.Option(..., "--patch", help="a saved patch (its neurons or first-token direction are "
                                                                  "what the search tries to excite)"),
    out: Path = typer.Option(..., "--out", "-o"),
    words: Optional[str] = typer.Option(None, "--words"),
    n_words: Optional[int] = typer.Option(8, "--n-words"),
    lengths: str = typer.Option("512", "--lengths"),
    k: int = typer.Option(64, "--k", help="clusters of layer-0 single-token representations"),
    probe_clusters: int = typer.Option(64, "--probe-clusters", help="largest clusters scored by the search"),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens"),
    batch_size: int = typer.Option(8, "--batch-size"),
    seed: int = typer.Option(0, "--seed"),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    revision: Optional[str] = REVISION_OPTION,
    trust_remote_code: bool = TRUST_OPTION,
) -> None:
    """Non-repeating sequences from the token cluster that most excites the patch's components (sink neurons or the
    first-token direction): divergence rate compared with plain repetition and random sequences of the same
    length."""
    from sinkscope.interventions.cluster_attack import cluster_attack
    from sinkscope.interventions.patch import read_patch
    from sinkscope.tasks.repeated_tokens import heldout_words

    p = read_patch(patch_dir)
    m, tok = _load(p.base_model, device, dtype, revision, trust_remote_code)
    ws = _words(tok, None, words, n_words, heldout_words(tok))
    res = cluster_attack(m, tok, p, ws, _lengths(lengths), k=k, probe_clusters=probe_clusters, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "cluster.json", res.to_json())
    _write_csv(out / "cluster.csv", res.rows)
    print(f"best cluster {res.best_cluster}: {res.clusters[0]['examples']} (score {res.clusters[0]['score']:.2f})")
    for r in res.rates:
        print(f"N={r['n']:>5} {r['kind']:>8}: diverged {r['rate']:.0%} of {r['words']} words, "
              f"circuit firing {r['sink_fire']:.2f} (1 = top of its ordinary range)")
