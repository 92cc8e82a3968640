"""`sinkscope repeat ...`: divergence scan, sink-circuit localisation, cluster attack, patch and its evaluation.

Each command parses its options into the library's option objects (checked before any model loads), takes the
output directory's lock (checked and created before any work), calls the library, lets the result save itself,
and prints. Progress: `sinkscope.progress.ProgressReporter` (a bar on a terminal, plain lines in a log).
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import typer

from sinkscope.cli.common import DEVICE_OPTION, DTYPE_OPTION, REVISION_OPTION, TRUST_OPTION, ModelOptions
from sinkscope.comma_lists import parse_names
from sinkscope.errors import InputError
from sinkscope.models.load import DEFAULT_MODEL

app = typer.Typer(help="The repeated-token phenomenon: detect divergence, find the sink circuit, attack, patch.",
                  no_args_is_help=True, add_completion=False)


def _model_options(model: str, device: str, dtype: str, revision: str | None, trust_remote_code: bool
                   ) -> ModelOptions:
    """The model spec, device, dtype and revision, checked without loading anything; ``.load()`` loads it."""
    return ModelOptions(model, device, dtype, revision, trust_remote_code)


def _lock(out: Path) -> AbstractContextManager[Path]:
    """The output directory checked, created and locked (a second job on it is refused), before any work; one the
    command created is removed again if it fails before writing anything (`sinkscope.cli.common.locked_output`)."""
    from sinkscope.cli.common import locked_output, output_dir

    return locked_output(output_dir(str(out)))


def _forms(spec: str) -> list[str]:
    from sinkscope.repetition.grid import PROTOCOL_FORMS

    if spec.strip() == "protocol":
        return list(PROTOCOL_FORMS)
    return list(parse_names(spec, flag="forms", empty="give at least one prompt form (or 'protocol')"))


def _lengths(spec: str) -> list[int]:
    from sinkscope.repetition.prompts import parse_lengths

    return parse_lengths(spec)


def _save_figure(path: Path, fig: Any) -> None:
    import matplotlib.pyplot as plt

    from sinkscope.io import save_figure_atomic

    save_figure_atomic(path, fig)
    plt.close(fig)


def _announce_stages(progress: Any, label: str) -> Any:
    """A progress callback that also prints a line of its own when the stage (``what``) changes: for jobs whose
    stages have their own counts."""
    last = [None]

    def callback(done: int, total: int | None = None, what: str = "") -> None:
        if what != last[0]:
            last[0] = what
            progress.message(f"{label}: {what}")
        progress(done, total, what)

    return callback


def _print_summary(summary: list[dict[str, Any]], *, variants: bool) -> None:
    for r in summary:
        extra = ""
        if "relative_reduction" in r:
            rel = r["relative_reduction"]
            extra = (f", unpatched {r['rate_unpatched']:.0%}, relative reduction "
                     f"{'n/a' if rel != rel else format(rel, '.0%')}")  # NaN: nothing diverged unpatched
        head = f"{r['variant']:>16} " if variants else ""
        print(f"{head}{r['form']:>12} N={r['n']:>5}: diverged {r['diverged']:>3}/{r['words']} ({r['rate']:.0%}), "
              f"stopped {r['stopped']}, repeats {r['repeats']}, loops {r['loops']}{extra}")


# ------------------------------------------------------------------------------------------------------------------
@app.command("scan")
def scan(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (re-running resumes finished cells)"),
    words_file: Path | None = typer.Option(None, "--words-file", help="one word per line"),
    words: str | None = typer.Option(None, "--words", help="comma-separated words (default: built-in list)"),
    n_words: int | None = typer.Option(None, "--n-words", help="use only the first K words"),
    lengths: str = typer.Option("2..1024", "--lengths", help="'LO..HI' (powers of two) or '64,512,1024'"),
    forms: str = typer.Option("instruct", "--forms", help="comma list: bare, instruct, garak1, garak3, garak40, "
                                                          "garak-word1, repeat-colon, or 'protocol'"),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens"),
    batch_size: int = typer.Option(8, "--batch-size", help="rows per generate call (prompts of equal length)"),
    sinkness_words: int = typer.Option(2, "--sinkness-words", help="first K words also get the layer-by-layer "
                                                                   "sinkness pass (-1: all)"),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    revision: str | None = REVISION_OPTION,
    trust_remote_code: bool = TRUST_OPTION,
) -> None:
    """Greedy continuations of words x lengths x prompt forms, judged whole (repeats, stopped, diverged), and the
    sinkness of the repeated tokens per layer. Writes cells.jsonl/cells.csv, summary.json/csv and plots."""
    from sinkscope.progress import ProgressReporter
    from sinkscope.repetition.grid import GridPlan, answer_settings, check_grid_settings, run_grid
    from sinkscope.repetition.words import WordChoice, default_words
    from sinkscope.viz.repetition import save_scan_figures

    if sinkness_words < -1:
        raise InputError(f"--sinkness-words must be >= 0, or -1 for all words, got {sinkness_words}",
                         param="sinkness_words")
    choice = WordChoice.from_cli(words, words_file, n_words)
    form_list, ns = _forms(forms), _lengths(lengths)
    check_grid_settings(form_list, ns, max_new_tokens, batch_size)  # before the model loads; words need it
    model_opts = _model_options(model, device, dtype, revision, trust_remote_code)
    with _lock(out):
        m, tok = model_opts.load()[:2]
        ws = choice.resolve(tok, default_words(tok))
        plan = GridPlan(ws, form_list, ns, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        sinkness_words=None if sinkness_words < 0 else ws[:sinkness_words])
        settings = answer_settings(model=model, dtype=dtype, revision=revision, max_new_tokens=max_new_tokens,
                                   patches={"none": None})
        with ProgressReporter("scan", unit="cells") as progress:
            result = run_grid(m, tok, plan, {"none": None}, out, settings=settings, progress=progress, lock=False)
        result.save(out)
        save_scan_figures(result.summary(), result.cells, out)
    _print_summary(result.summary(), variants=False)


# ------------------------------------------------------------------------------------------------------------------
@app.command("circuit")
def circuit(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m"),
    out: Path = typer.Option(..., "--out", "-o"),
    corpus: Path | None = typer.Option(None, "--corpus", help="ordinary text (default: the shipped WikiText-2 "
                                                                 "text)"),
    words: str | None = typer.Option(None, "--words", help="run words (default: 8 of the patch-building words)"),
    n: int = typer.Option(512, "--n", help="repetitions in the runs measured for firing"),
    mode: str = typer.Option("zero", "--mode", help="zero | mean ablation at token 0"),
    heads: bool = typer.Option(True, "--heads/--no-heads", help="also ablate every attention head"),
    per_layer: int = typer.Option(8, "--per-layer", help="first-token neuron candidates per layer"),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens"),
    batch_size: int = typer.Option(8, "--batch-size"),
    exact: int | None = typer.Option(None, "--exact", help="pruned search: candidates of linear layers ablated "
                                                              "exactly, by attribution estimate (default 32)"),
    exhaustive: bool = typer.Option(False, "--exhaustive", help="ablate every candidate exactly (no attribution "
                                                                "pruning)"),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    revision: str | None = REVISION_OPTION,
    trust_remote_code: bool = TRUST_OPTION,
) -> None:
    """Find the heads and neurons that create token 0's sink (ablation at token 0, ranked by effect) and which of
    them fire on long repeated runs and before divergence. With more candidates than --exact, only the candidates
    of layers whose joint ablation the attribution estimates miss, plus the --exact best-estimated others, are
    ablated (settings.search says so); --exhaustive ablates all. Writes circuit.json/csv, neuron_stats.pt,
    circuit.png."""
    from sinkscope.progress import ProgressReporter
    from sinkscope.repetition.circuit import DEFAULT_EXACT, CircuitOptions, run_circuit
    from sinkscope.repetition.words import PATCH_WORDS, WordChoice
    from sinkscope.viz.repetition import circuit_effects

    if exhaustive and exact is not None:
        raise InputError("give --exact or --exhaustive, not both", param="exact")
    choice = WordChoice.from_cli(words, None)
    opts = CircuitOptions(choice.words or tuple(PATCH_WORDS[:8]), n=n, mode=mode, heads=heads, per_layer=per_layer,
                          max_new_tokens=max_new_tokens, batch_size=batch_size,
                          exact=None if exhaustive else (DEFAULT_EXACT if exact is None else exact),
                          corpus=str(corpus) if corpus is not None else None)
    if corpus is not None:
        from sinkscope.io import read_text_file

        read_text_file(corpus, "corpus file")
    model_opts = _model_options(model, device, dtype, revision, trust_remote_code)
    with _lock(out):
        m, tok = model_opts.load()[:2]
        t0 = time.perf_counter()
        with ProgressReporter("circuit") as progress:
            res = run_circuit(m, tok, opts, progress=_announce_stages(progress, "circuit"))
        res.save(out)
        _save_figure(out / "circuit.png", circuit_effects(res.circuit.to_json()["components"]))
    circ = res.circuit
    st = circ.settings
    print(f"search: {st['search']} ({st['ablated_exactly']} of {st['candidates']} candidates ablated exactly"
          + (f"; nonlinear layer groups: {', '.join(st['nonlinear_groups']) or 'none'}" if st["search"] != "exhaustive"
             else "") + f"), {time.perf_counter() - t0:.0f} s")
    print(f"{'rank':>4} {'component':>10} {'effect':>7} {'resid':>7} {'attn':>7} {'fire_run':>8} {'fire_div':>8}")
    for i, c in enumerate(circ.components[:15]):
        name = c.component.name
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
                                                         "(conditional clamp of circuit neurons) | paper (alias "
                                                         "yona: Yona et al.'s patch, the sink layer's sink neurons, "
                                                         "every position but the first)"),
    dedup: bool | None = typer.Option(None, "--dedup/--no-dedup", help="direction: also count repeated keys once "
                                                                          "in attention (default on)"),
    dedup_keep: int | None = typer.Option(None, "--dedup-keep", help="direction/dedup: repeated keys keep the "
                                                                        "weight of this many keys (default 1: "
                                                                        "counted once)"),
    dedup_queries: str | None = typer.Option(None, "--dedup-queries", help="direction/dedup: gated (default: "
                                                                              "only queries inside a repetition "
                                                                              "discount it) | all"),
    dedup_reach: int | None = typer.Option(None, "--dedup-reach", help="direction/dedup with gated queries: "
                                                                          "queries this many tokens after a "
                                                                          "repetition still discount it (default 0)"),
    circuit_dir: Path | None = typer.Option(None, "--circuit", help="neurons: output of `repeat circuit` "
                                                                       "(else run it)"),
    corpus: Path | None = typer.Option(None, "--corpus", help="direction/neurons/paper: ordinary text for the "
                                                                 "ordinary ranges (default: shipped WikiText-2)"),
    words: str | None = typer.Option(None, "--words", help="patch-building words (default: built-in)"),
    n: int | None = typer.Option(None, "--n", help="copies in the measured runs (direction: 1024, neurons: 512)"),
    layer: int | None = typer.Option(None, "--layer", help="direction: force the layer (default: chosen from "
                                                              "the runs)"),
    window: int | None = typer.Option(None, "--window", help="direction/dedup: repetition gate window (default "
                                                                "32 tokens)"),
    min_cos: float | None = typer.Option(None, "--min-cos", help="direction/dedup: gate opens at this mean "
                                                                    "embedding cosine (default 0.8)"),
    fire_min: float | None = typer.Option(None, "--fire-min", help="neurons: keep neurons above range on this "
                                                                      "share of run positions (default 0.2)"),
    margin: float | None = typer.Option(None, "--margin", help="neurons: threshold = margin x ordinary-text max "
                                                                  "(default 1)"),
    batch_size: int | None = typer.Option(None, "--batch-size", help="direction/neurons/paper (default 8)"),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    revision: str | None = REVISION_OPTION,
    trust_remote_code: bool = TRUST_OPTION,
) -> None:
    """Build the sink patch with the method's own options and save it; `sinkscope.load_model(DIR)` restores the
    base model with the patch active. An option the method does not take is refused.

    dedup (default, ours): inside a repetition (the gate), the repeated keys share one key's attention, for
    queries inside the repetition only (--dedup-queries gated): no measurement needed. direction: adds the
    first-token direction of the layer where long runs stand out most, clamped back to its ordinary median inside
    repetitions. neurons: the circuit's first-token neurons that fire on runs, clamped where they exceed their
    ordinary range. paper (alias yona): Yona et al.'s published patch (sink layer and neurons by their rules,
    every position but the first)."""
    from sinkscope.repetition.patch_methods import build_patch, patch_method
    from sinkscope.repetition.words import WordChoice

    meth = patch_method(method)
    given = {"dedup": dedup, "dedup_keep": dedup_keep, "dedup_queries": dedup_queries, "dedup_reach": dedup_reach,
             "circuit": str(circuit_dir) if circuit_dir is not None else None,
             "corpus": str(corpus) if corpus is not None else None, "words": WordChoice.from_cli(words, None).words,
             "n": n, "layer": layer, "window": window, "min_cos": min_cos, "fire_min": fire_min, "margin": margin,
             "batch_size": batch_size}
    opts = meth.make_options(given)
    if corpus is not None:
        from sinkscope.io import read_text_file

        read_text_file(corpus, "corpus file")
    model_opts = _model_options(model, device, dtype, revision, trust_remote_code)
    with _lock(save):
        m, tok = model_opts.load()[:2] if meth.needs_model else (None, None)
        from sinkscope.progress import ProgressReporter

        with ProgressReporter(f"patch ({meth.name})") as progress:
            built = build_patch(meth.name, opts, base_model=model, model=m, tokenizer=tok, base_revision=revision,
                                progress=_announce_stages(progress, "patch"))
        built.save(save)
    print(f"saved patch ({built.patch.describe()}) to {save}")
    for line in built.lines:
        print(line)


# ------------------------------------------------------------------------------------------------------------------
def _variant_names(dirs: list[Path]) -> list[str]:
    """One name per patch directory (its folder name; numbered when two share a name)."""
    from sinkscope.repetition.grid import NO_PATCH

    names: list[str] = []
    for d in dirs:
        base = d.resolve().name or "patch"
        name, k = base, 2
        while name in names or name == NO_PATCH:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def _harm_sets(spec: str) -> dict[str, Any]:
    from sinkscope.repetition.harm import load_harm_set

    names = list(parse_names(spec, flag="harm-sets", empty="give dev, eval, a directory, or none"))
    if names == ["none"]:
        return {}
    return {Path(n).name if n not in ("dev", "eval") else n: load_harm_set(n) for n in names}


@app.command("evaluate")
def evaluate(
    patch_dirs: list[Path] = typer.Option(..., "--patch", help="a directory saved by `repeat patch` (repeat the "
                                                                "option to compare several patches)"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (re-running resumes finished cells)"),
    model: str | None = typer.Option(None, "--model", "-m", help="load the base model from here instead of "
                                                                    "the spec in the manifest (same weights, "
                                                                    "another location, e.g. a .gguf on a GPU box)"),
    word_set: str = typer.Option("eval", "--word-set", help="eval (words no design choice has seen) | dev"),
    words_file: Path | None = typer.Option(None, "--words-file", help="one word per line (instead of a set)"),
    words: str | None = typer.Option(None, "--words", help="comma-separated words (instead of a set)"),
    n_words: int | None = typer.Option(None, "--n-words", help="use only the first K words"),
    forms: str = typer.Option("instruct", "--forms", help="comma list of prompt forms, or 'protocol' (instruct, "
                                                          "the garak forms, bare, repeat-colon)"),
    lengths: str = typer.Option("1024", "--lengths", help="repetition lengths; the protocol: 256,512,1024,2048"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="answer length (the protocol: >= 128)"),
    harm_sets: str = typer.Option("eval", "--harm-sets", help="natural-repetition documents: eval, dev, both "
                                                              "(dev,eval), a directory, or none"),
    corpus: Path | None = typer.Option(None, "--corpus", help="ordinary text for KL / perplexity (default: the "
                                                                 "shipped WikiText-2 validation text)"),
    text: bool = typer.Option(True, "--text/--no-text", help="measure KL / perplexity on text and harm sets"),
    divergence: bool = typer.Option(True, "--divergence/--no-divergence", help="run the divergence grid"),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    revision: str | None = REVISION_OPTION,
    trust_remote_code: bool = TRUST_OPTION,
    batch_size: int = typer.Option(8, "--batch-size", help="rows per generate call (prompts of equal length)"),
) -> None:
    """Divergence with and without each patch (words x forms x N, greedy answers judged whole: repeats, stopped,
    diverged), and what each patch does to text: KL / perplexity / Sink_0 on WikiText and, per family, on the
    natural-repetition documents (gate openings, KL inside and after the repeated stretch, NLL after it, top-1
    agreement). Writes cells.jsonl (resumable), summary.csv/json, harm_<set>.csv, evaluation.json."""
    from sinkscope.interventions.patch import read_patch
    from sinkscope.models.adapters import get_adapter
    from sinkscope.progress import ProgressReporter
    from sinkscope.repetition.corpus import read_corpus
    from sinkscope.repetition.evaluation import EvaluationOptions, evaluate_patches
    from sinkscope.repetition.grid import NO_PATCH, GridPlan, answer_settings, check_grid_settings
    from sinkscope.repetition.words import WordChoice

    opts = EvaluationOptions(text=text, divergence=divergence, batch_size=batch_size)
    if not patch_dirs:
        raise InputError("--patch: give at least one patch directory", param="patch")
    patches = [read_patch(d) for d in patch_dirs]
    bases = {p.base_model for p in patches}
    if len(bases) > 1:
        raise InputError(f"the patches were built on different base models: {', '.join(sorted(bases))}")
    names = _variant_names(list(patch_dirs))
    choice = WordChoice.from_cli(words, words_file, n_words, None if (words or words_file) else word_set)
    form_list, ns = _forms(forms), _lengths(lengths)
    check_grid_settings(form_list, ns, max_new_tokens, batch_size)  # before the model loads
    hsets = _harm_sets(harm_sets) if text else {}
    text_src = read_corpus(corpus) if text else ""
    spec = model or patches[0].base_model
    model_opts = _model_options(spec, device, dtype, revision, trust_remote_code)
    with _lock(out):
        m, tok = model_opts.load()[:2]
        ws = choice.resolve(tok)
        plan = GridPlan(ws, form_list, ns, [NO_PATCH, *names], max_new_tokens, batch_size)
        if divergence:
            plan.validate(tok, get_adapter(m).max_positions)
        by_name = dict(zip(names, patches))
        settings = {"patches": {n: str(d) for n, d in zip(names, patch_dirs)},
                    "describe": {n: p.describe() for n, p in zip(names, patches)},
                    "base_model": patches[0].base_model, "model": model, "words": ws,
                    "word_set": None if (words or words_file) else word_set, "forms": form_list, "lengths": ns,
                    "max_new_tokens": max_new_tokens, "protocol": max_new_tokens >= 128, "device": device,
                    "dtype": dtype, "batch_size": batch_size,
                    "corpus": str(corpus) if corpus else "shipped wikitext2-valid"}
        grid_settings = answer_settings(model=spec, dtype=dtype, revision=revision, max_new_tokens=max_new_tokens,
                                        patches={NO_PATCH: None, **by_name})
        if divergence:
            print(f"divergence: {plan.n_cells} answers ({len(ws)} words x {len(form_list)} forms x {len(ns)} lengths "
                  f"x {len(plan.variants)} variants), {max_new_tokens} new tokens, up to {batch_size} equal-length "
                  "rows per batch", flush=True)
        with ProgressReporter("evaluate", unit="cells") as progress:
            res = evaluate_patches(m, tok, by_name, plan, out, opts, text=text_src, harm_sets=hsets,
                                   settings=settings, answer_settings=grid_settings, progress=progress, lock=False)
    if res.grid is not None:
        _print_summary(res.grid.summary(), variants=True)
    for name, se in (res.side_effects or {}).items():
        t = se["text"]
        print(f"{name}: WikiText KL {t['kl']:.2e} nats/token (max {t['kl_max']:.2e}), perplexity "
              f"{t['ppl_original']:.3f} -> {t['ppl_patched']:.3f} ({t['ppl_change']:+.3%}); Sink_0 "
              f"{se['sink_ratio_before']:.3f} -> {se['sink_ratio_after']:.3f}")
        for hs, h in se["harm"].items():
            for r in h["families"]:
                print(f"  harm {hs:>4} {r['family']:>9}: gate opened {r['gate_opened']}/{r['documents']}, KL "
                      f"inside {r['kl_inside']:.4f} after {r['kl_after']:.4f} all {r['kl_all']:.4f}, NLL after "
                      f"{r['nll_after_original']:.3f} -> {r['nll_after_patched']:.3f}, perplexity "
                      f"{r['ppl_change']:+.2%}, top-1 after {r['top1_after']:.3f}")


# ------------------------------------------------------------------------------------------------------------------
@app.command("sinkrun")
def sinkrun(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (re-running resumes finished cells)"),
    word_set: str = typer.Option("eval", "--word-set", help="eval (words no design choice has seen) | dev"),
    words: str | None = typer.Option(None, "--words", help="comma-separated words (instead of a set)"),
    n_words: int | None = typer.Option(None, "--n-words", help="use only the first K words"),
    forms: str = typer.Option("repeat-colon,instruct", "--forms", help="comma list of prompt forms"),
    lengths: str = typer.Option("1..512", "--lengths", help="run lengths N: 'LO..HI' (powers of two) or a list"),
    eps: float = typer.Option(0.3, "--eps", help="a head sinks on a key when its alpha there exceeds eps"),
    share: float = typer.Option(0.5, "--share", help="a copy is a sink when this share of heads sinks on it"),
    min_queries: int = typer.Option(8, "--min-queries", help="copies seen by fewer queries (the run's last ones) "
                                                             "do not count as sinks"),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    revision: str | None = REVISION_OPTION,
    trust_remote_code: bool = TRUST_OPTION,
) -> None:
    """Yona et al.'s repeated token as a sink, per run length N: the share of heads that sink on each copy, the
    first copy that is a sink, token 0's Sink_0, and the last copy's distance to the one-token sequence per layer
    (their Theorem 4.1). Writes cells.jsonl (resumable), summary.json/csv, cells.csv, curves.csv, sink_run.png."""
    from sinkscope.progress import ProgressReporter
    from sinkscope.repetition.prompts import check_form
    from sinkscope.repetition.sink_run import SinkRunOptions, run_sink_runs
    from sinkscope.repetition.words import WordChoice
    from sinkscope.viz.repetition import sink_run_figure

    opts = SinkRunOptions(eps=eps, share=share, min_queries=min_queries)
    choice = WordChoice.from_cli(words, None, n_words, word_set=word_set)  # --words, if given, wins
    form_list, ns = _forms(forms), _lengths(lengths)
    for f in form_list:
        check_form(f)
    model_opts = _model_options(model, device, dtype, revision, trust_remote_code)
    with _lock(out):
        m, tok = model_opts.load()[:2]
        ws = choice.resolve(tok)
        settings = {"model": model, "revision": revision, "dtype": dtype}
        with ProgressReporter("sinkrun", unit="cells") as progress:
            res = run_sink_runs(m, tok, ws, form_list, ns, out, options=opts, settings=settings, progress=progress,
                                lock=False)
        res.save(out)
        _save_figure(out / "sink_run.png", sink_run_figure(res.summary(), res.curves(), min_queries=min_queries))
    for r in res.summary():
        first = "none" if r["median_first_sink_copy"] is None else f"median copy {r['median_first_sink_copy']:g}"
        print(f"{r['form']:>12} N={r['n']:>5}: sink copy in {r['words_with_sink_copy']}/{r['words']} words ({first}), "
              f"largest share {r['mean_max_share'] if r['mean_max_share'] is not None else float('nan'):.3f}, "
              f"Sink_0 {r['mean_sink0']:.3f}, distance to (x) at the last layer {r['distance_last_layer']:.3f}")


# ------------------------------------------------------------------------------------------------------------------
@app.command("cluster")
def cluster(
    patch_dir: Path = typer.Option(..., "--patch", help="a saved patch (its neurons or first-token direction are "
                                                        "what the search tries to excite)"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (re-running resumes finished answers)"),
    defence_dir: Path | None = typer.Option(None, "--defence", help="a saved patch (e.g. the default, `repeat "
                                                                    "patch`): every prompt is also answered with "
                                                                    "it applied"),
    words: str | None = typer.Option(None, "--words"),
    word_set: str | None = typer.Option(None, "--word-set", help="eval | dev (default: the built-in words outside "
                                                                 "the patch words)"),
    n_words: int | None = typer.Option(8, "--n-words"),
    lengths: str = typer.Option("512", "--lengths"),
    k: int = typer.Option(64, "--k", help="clusters of layer-0 single-token representations"),
    probe_clusters: int = typer.Option(64, "--probe-clusters", help="largest clusters scored by the search"),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens"),
    batch_size: int = typer.Option(8, "--batch-size"),
    seed: int = typer.Option(0, "--seed"),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    revision: str | None = REVISION_OPTION,
    trust_remote_code: bool = TRUST_OPTION,
) -> None:
    """Non-repeating sequences from the token cluster that most excites the patch's components (sink neurons or the
    first-token direction): divergence rate (with its Wilson 95% interval) compared with plain repetition and random
    sequences of the same length, unpatched and (--defence) under a defence patch. Writes cells.jsonl (resumable),
    cluster.json, cluster.csv and rates.csv."""
    from sinkscope.interventions.patch import read_patch
    from sinkscope.progress import ProgressReporter
    from sinkscope.repetition.cluster_attack import ClusterAttackOptions, check_scorable, cluster_attack
    from sinkscope.repetition.words import WordChoice, heldout_words

    opts = ClusterAttackOptions(k=k, probe_clusters=probe_clusters, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, seed=seed)
    choice = WordChoice.from_cli(words, None, n_words, word_set=word_set)
    ns = _lengths(lengths)
    p = read_patch(patch_dir)
    check_scorable(p)
    defence = None
    if defence_dir is not None:
        dp = read_patch(defence_dir)
        if dp.base_model != p.base_model:
            raise InputError(f"--defence was made for {dp.base_model!r}, --patch for {p.base_model!r}: give patches of "
                             "one model", param="defence")
        from sinkscope.repetition.cluster_attack import NO_DEFENCE

        name = defence_dir.resolve().name or "defence"
        if name == NO_DEFENCE:
            raise InputError(f"--defence: the directory name {NO_DEFENCE!r} is reserved for the unpatched answers; "
                             "rename it", param="defence")
        defence = (name, dp)
    model_opts = _model_options(p.base_model, device, dtype, revision, trust_remote_code)
    with _lock(out):
        m, tok = model_opts.load()[:2]
        ws = choice.resolve(tok, heldout_words(tok))
        settings = {"model": p.base_model, "revision": revision, "dtype": dtype}
        with ProgressReporter("cluster", unit="answers") as progress:
            res = cluster_attack(m, tok, p, ws, ns, opts, defence=defence, out_dir=out, settings=settings,
                                 progress=progress, lock=False)
        res.save(out)
    print(f"best cluster {res.best_cluster}: {res.clusters[0]['examples']} (score {res.clusters[0]['score']:.2f})")
    for r in res.rates:
        print(f"N={r['n']:>5} {r['kind']:>8} {r['variant']:>10}: diverged {r['diverged']}/{r['words']} "
              f"({r['rate']:.0%}, 95% CI {r['ci_low']:.0%}-{r['ci_high']:.0%}), circuit firing {r['sink_fire']:.2f} "
              "(1 = top of its ordinary range)")
