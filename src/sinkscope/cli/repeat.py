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

from sinkscope.errors import InputError
from sinkscope.models.load import DEFAULT_MODEL

app = typer.Typer(help="The repeated-token phenomenon: detect divergence, find the sink circuit, attack, patch.",
                  no_args_is_help=True, add_completion=False)
console = Console(stderr=True)


@contextmanager
def _progress(label: str, total: int) -> Iterator[Any]:
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                  disable=not sys.stderr.isatty()) as p:
        task = p.add_task(label, total=total)
        yield lambda done, tot=None: p.update(task, completed=done, total=tot or total)


def _write_json(path: Path, obj: Any) -> None:
    from sinkscope.io import write_json_atomic

    write_json_atomic(path, obj)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    from sinkscope.io import write_csv_atomic

    write_csv_atomic(path, [{k: v for k, v in r.items() if not isinstance(v, (dict, list))} for r in rows])


def _save_fig(path: Path, fig: Any) -> None:
    import matplotlib.pyplot as plt

    from sinkscope.io import save_figure_atomic

    save_figure_atomic(path, fig)
    plt.close(fig)


def _words(tokenizer: Any, words_file: Optional[Path], words: Optional[str], n_words: Optional[int],
           default: list[str]) -> list[str]:
    from sinkscope.tasks.repeated_tokens import read_words, run_token_id

    ws = read_words(words_file) if words_file else ([w.strip() for w in words.split(",") if w.strip()] if words
                                                     else list(default))
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


def _load(model: str):
    from sinkscope.plugins import load_model

    return load_model(model)


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
    batch_size: int = typer.Option(8, "--batch-size"),
    sinkness_words: int = typer.Option(2, "--sinkness-words", help="first K words also get the layer-by-layer "
                                                                   "sinkness pass (-1: all)"),
) -> None:
    """Greedy continuations of words x lengths x prompt forms: divergence verdicts, what was emitted instead, and the
    sinkness of the repeated tokens per layer. Writes cells.jsonl/cells.csv, summary.json/csv and plots."""
    from sinkscope.repetition.scan import ScanPlan, scan_repetition, summarise
    from sinkscope.tasks.repeated_tokens import default_words
    from sinkscope.viz.repetition import divergence_vs_length, similarity_vs_position

    m, tok = _load(model)
    ws = _words(tok, words_file, words, n_words, default_words(tok))
    plan = ScanPlan(ws, _lengths(lengths), [f.strip() for f in forms.split(",") if f.strip()], max_new_tokens,
                    batch_size, None if sinkness_words < 0 else ws[:sinkness_words])
    t0 = time.perf_counter()
    with _progress("scan", len(ws) * len(plan.lengths) * len(plan.forms)) as tick:
        cells = scan_repetition(m, tok, plan, out, on_cells=tick)
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
) -> None:
    """Find the heads and neurons that create token 0's sink (ablation at token 0, ranked by effect) and which of
    them fire on long repeated runs and before divergence. With more candidates than --exact, only the candidates
    of layers whose joint ablation the attribution estimates miss, plus the --exact best-estimated others, are
    ablated (settings.search says so); --exhaustive ablates all. Writes circuit.json/csv, circuit.png."""
    from sinkscope.tasks.repeated_tokens import PATCH_WORDS

    if exact is not None and exact < 1:
        raise InputError(f"--exact must be a positive number of candidates, got {exact}")
    m, tok = _load(model)
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
    method: str = typer.Option("direction", "--method", help="direction (gated clamp of the first-token direction "
                                                             "+ attention de-duplication) | dedup (only the "
                                                             "de-duplication) | neurons (conditional clamp of "
                                                             "circuit neurons)"),
    dedup: bool = typer.Option(True, "--dedup/--no-dedup", help="direction: also count repeated keys once in "
                                                                "attention"),
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
) -> None:
    """Build the sink patch and save it; `sinkscope.load_model(DIR)` restores the base model with the patch active.

    direction (default): the first-token direction of the layer where long runs stand out most, clamped back to
    its ordinary median only inside repetitions, and the keys inside a repetition counted once in attention.
    dedup: only the latter. neurons: the circuit's first-token neurons that fire on runs, clamped where they exceed
    their ordinary range."""
    from sinkscope.interventions.patch import build_patch, save_patch
    from sinkscope.tasks.repeated_tokens import PATCH_WORDS

    if method not in ("direction", "dedup", "neurons"):
        raise InputError(f"unknown --method {method!r}; choose direction, dedup or neurons")
    if method == "dedup":
        from sinkscope.repetition.direction import dedup_patch

        _load(model)  # fails early on a bad model spec
        p = dedup_patch(base_model=model, window=window, min_cos=min_cos)
        save_patch(p, save)
        print(f"saved patch ({p.describe()}) to {save}")
        return
    m, tok = _load(model)
    if method == "direction":
        from sinkscope.repetition.corpus import calibration_sequences
        from sinkscope.repetition.direction import build_direction_patch

        ws = _words(tok, None, words, None, list(PATCH_WORDS[:8]))
        with _progress("measure directions and runs", 1) as tick:
            p, report = build_direction_patch(m, tok, calibration_sequences(tok, _corpus_text(corpus)), ws,
                                              base_model=model, n=n or 1024, layer=layer, window=window,
                                              min_cos=min_cos, attention_dedup=dedup, batch_size=batch_size)
            tick(1)
        save_patch(p, save)
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
    save_patch(p, save)
    print(f"saved patch ({p.describe()}) to {save}")
    for r in p.rules:
        print(f"  layer {r.layer}: neurons {r.index} thresholds {[round(t, 2) for t in r.threshold]}")


# ------------------------------------------------------------------------------------------------------------------
@app.command("evaluate")
def evaluate(
    patch_dir: Path = typer.Option(..., "--patch", help="a directory saved by `repeat patch`"),
    out: Path = typer.Option(..., "--out", "-o"),
    words_file: Optional[Path] = typer.Option(None, "--words-file"),
    words: Optional[str] = typer.Option(None, "--words", help="default: built-in words not used to build patches"),
    n_words: Optional[int] = typer.Option(30, "--n-words"),
    lengths: str = typer.Option("512,1024", "--lengths"),
    form: str = typer.Option("instruct", "--form"),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="ordinary text for KL / perplexity"),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens"),
    batch_size: int = typer.Option(8, "--batch-size"),
) -> None:
    """Divergence before/after on held-out words, KL(original || patched) and perplexity change on ordinary text,
    token 0's sink ratio. Writes evaluation.json/csv and a plot."""
    from sinkscope.interventions.patch import read_patch
    from sinkscope.repetition.corpus import heldout_sequences
    from sinkscope.repetition.evaluate import evaluate_patch
    from sinkscope.tasks.repeated_tokens import heldout_words
    from sinkscope.viz.repetition import patch_rates

    p = read_patch(patch_dir)
    m, tok = _load(p.base_model)
    ws = _words(tok, words_file, words, n_words, heldout_words(tok))
    ns = _lengths(lengths)
    seqs = heldout_sequences(tok, _corpus_text(corpus))
    with _progress("evaluate", 2 * len(ws) * len(ns)) as tick:
        done = {"n": 0}

        def on_batch(k: int) -> None:
            done["n"] += k
            tick(done["n"])

        ev = evaluate_patch(m, tok, p, ws, ns, seqs, form=form, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, on_batch=on_batch)
    d = ev.to_json()
    d["settings"].update({"patch": str(patch_dir), "corpus": str(corpus) if corpus else "shipped WikiText-2"})
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "evaluation.json", d)
    _write_csv(out / "evaluation.csv", ev.verdicts)
    _save_fig(out / "patch_rates.png", patch_rates(ev.rates))
    for r in ev.rates:
        print(f"N={r['n']:>5}: diverged {r['rate_before']:.0%} -> {r['rate_after']:.0%} "
              f"(relative reduction {r['relative_reduction']:.0%}) on {r['words']} words")
        if "first_like_words" in r:
            print(f"         runs gone first-like: {r['first_like_words']} words, diverged "
                  f"{r['first_like_diverged_before']} -> {r['first_like_diverged_after']}; other runs: diverged "
                  f"{r['other_diverged_before']} -> {r['other_diverged_after']}")
    t = ev.text
    print(f"text: KL {t.kl:.2e} nats/token (max {t.kl_max:.2e}), perplexity {t.ppl_original:.3f} -> "
          f"{t.ppl_patched:.3f} ({t.ppl_change:+.3%}), activations clamped {t.clamped}")
    print(f"Sink_0 (eps 0.3): {ev.sink_ratio_before:.3f} -> {ev.sink_ratio_after:.3f}")


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
) -> None:
    """Non-repeating sequences from the token cluster that most excites the patch's components (sink neurons or the
    first-token direction): divergence rate compared with plain repetition and random sequences of the same
    length."""
    from sinkscope.interventions.cluster_attack import cluster_attack
    from sinkscope.interventions.patch import read_patch
    from sinkscope.tasks.repeated_tokens import heldout_words

    p = read_patch(patch_dir)
    m, tok = _load(p.base_model)
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
