"""Docs tables and quoted numbers, rendered from the committed results under ``docs/results/`` and ``bench/results/``.

    python tools/docs_tables.py            # check: exit 1 and a diff when a docs table or quoted number differs
    python tools/docs_tables.py --write    # rewrite every marked table in the docs from its results

A table in README.md or docs/*.md that is made from results sits between two markers::

    <!-- table: NAME SOURCE -->
    | ... the table, exactly as RENDERERS[NAME](ROOT / SOURCE) prints it ... |
    <!-- /table -->

``NAME`` picks a renderer below (a function of the results path returning Markdown), ``SOURCE`` is the results
file or folder, relative to the repository root. Numbers quoted in prose are ``Quote`` entries: a regular
expression with one group that must match exactly once in its document, and a function of the results giving
the text that group must read. ``tests/unit/test_docs_numbers.py`` runs the check in the unit tier, and also runs
it on altered copies to show that it fails on a mismatch.

Every results folder holds a ``command.json`` (``tools/record_result.py``) naming the command that made it.
This module is a docs tool: the package never imports it.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import gzip
import json
import re
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: documents whose marked tables and quotes are checked (``docs/benchmarks.md`` where it exists: the benchmark
#: narration may move there from the README, and the checks below look for their tables in either)
DOCS = ("README.md", "docs/streaming.md", "docs/training.md", "docs/report.md", "docs/repetition.md",
        "docs/benchmarks.md")
#: where a benchmark table or quote may stand
BENCH_DOCS = ("README.md", "docs/benchmarks.md")

MARKER = re.compile(r"<!-- table: (?P<name>[\w-]+) (?P<source>\S+) -->\n(?P<body>.*?)<!-- /table -->", re.S)

Renderer = Callable[[Path], str]
RENDERERS: dict[str, Renderer] = {}


def renderer(name: str) -> Callable[[Renderer], Renderer]:
    def register(fn: Renderer) -> Renderer:
        RENDERERS[name] = fn
        return fn
    return register


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: ``| a | b |`` lines, a ``|---|`` rule, one line per row, trailing newline."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["|" + "|".join(f" {c} " if str(c) else " " for c in row) + "|" for row in rows]  # empty cell: "| |"
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- scan

SCAN_LENGTHS = (16, 32, 64, 256)


def massive_summary(profile: dict[str, Any]) -> tuple[int, float, float]:
    """(dim, |value|, that layer's median |x|) of the largest massive activation over all layers."""
    best = max(profile["massive_activations"], key=lambda r: max(abs(t["value"]) for t in r["top"]))
    top = max(best["top"], key=lambda t: abs(t["value"]))
    return top["dim"], abs(top["value"]), best["median_abs"]


@renderer("scan-lengths")
def render_scan_lengths(source: Path) -> str:
    """README's scan table: one row per ``--max-tokens T`` run (``SOURCE/T{T}/profile.json``)."""
    rows = []
    for t in SCAN_LENGTHS:
        p = read_json(source / f"T{t}" / "profile.json")
        r = p["residual_ratio_first_by_layer"]
        dim, value, median = massive_summary(p)
        rows.append([str(t), f"{p['sink_ratio']:.3f}", f"{r[2]:.1f} / {r[5]:.1f} / {r[8]:.1f}",
                     f"{p['residual_peak']['ratio']:.1f}x ({p['residual_peak']['layer']})", f"{r[-1]:.1f}x",
                     f"dim {dim}: {value:.0f} vs median {median:.1f}"])
    return md_table(["T", "`Sink_0^0.3`", "residual ratio of token 0, layers 2 / 5 / 8", "peak (layer)",
                     "last layer", "massive activation"], rows)


@renderer("scan-example")
def render_scan_example(source: Path) -> str:
    """README's scan example: the command's terminal output (``SOURCE/stdout.txt``; the terminal wrapped it, so it
    is re-wrapped at 110 columns), the output folder renamed to the one the README's command names (``out/scan``)."""
    words = (source / "stdout.txt").read_text().replace("out/scan_example", "out/scan").split()
    return "```\n" + textwrap.fill(" ".join(words), width=110) + "\n```\n"


# ---------------------------------------------------------------------------------------------------- benchmarks


def _in_process(path: Path) -> dict[int, dict[str, Any]]:
    return {r["T"]: r for r in read_json(path)["in_process"]}


@renderer("profile-parts")
def render_profile_parts(source: Path) -> str:
    """Where the fused profile's time goes, per length (``SOURCE`` = ``bench/results/profile.json``)."""
    rows = []
    for t, r in sorted(_in_process(source).items()):
        b, f = r["bare_parts"], r["fused_parts"]
        rows.append([str(t), f"{r['bare_s']:.2f} ({b['sdpa_s']:.2f} + {b['outside_sdpa_s']:.2f})", f"{r['fused_s']:.2f}",
                     f"{f['first_pass_s']:.2f}", f"{f['column_sums_s']:.2f}", f"{f['other_stats_s']:.2f}",
                     f"{f['hooks_s']:.2f}", f"{f['rest_s']:.2f}", f"{r['chunked_stats_s']:.2f}"])
    return md_table(["T", "bare s (SDPA + rest, one run)", "fused profile s", "1st pass s", "column sums s",
                     "other statistics s", "hooks s", "rest s", "chunked statistics s"], rows)


@renderer("profile-fresh")
def render_profile_fresh(source: Path) -> str:
    """The fresh-process memory table the benchmark wrote into its JSON (``tables["fresh_process"]``)."""
    return read_json(source)["tables"]["fresh_process"].strip("\n") + "\n"


def _bold_if_met(t: int, ratio: float) -> str:
    """The fused / bare ratio, bold where it meets its target (<= 1.3x at T <= 2048, <= 1.7x at 8192)."""
    text = f"{ratio:.2f}x"
    met = (t <= 2048 and ratio <= 1.3) or (t == 8192 and ratio <= 1.7)
    return f"**{text}**" if met else text


@renderer("profile-quiet")
def render_profile_quiet(source: Path) -> str:
    """README's quiet-machine profile table: ``SOURCE`` (``profile_quiet.json``) and its ``_long`` sibling."""
    rows = []
    for path in (source, source.with_name(source.stem + "_long.json")):
        for t, r in sorted(_in_process(path).items()):
            hooks = r["fused_parts"]["hooks_s"]
            rows.append([str(t), f"{r['bare_s']:.2f}", f"{r['fused_s']:.2f}", _bold_if_met(t, r["fused_ratio"]),
                         f"{r['chunked_ratio']:.2f}x", f"{hooks:.2f} ({100 * hooks / r['bare_s']:.0f}%)"])
    return md_table(["T", "bare SDPA s", "fused profile s", "fused / bare", "chunked / bare",
                     "hooks s (share of bare)"], rows)


@renderer("profile-loads")
def render_profile_loads(source: Path) -> str:
    """README's three busy-machine runs side by side: ``SOURCE`` (``profile.json``) and its siblings
    ``profile_short.json``, ``profile_lowload.json`` (fused / bare each, then chunked / bare of the three; ``-``:
    length not run)."""
    runs = [_in_process(source.with_name(n)) for n in (source.name, "profile_short.json", "profile_lowload.json")]
    rows = []
    for t in sorted(runs[0]):
        fused = [f"{r[t]['fused_ratio']:.2f}x" if t in r else "" for r in runs]
        chunked = ", ".join(f"{r[t]['chunked_ratio']:.2f}x" if t in r else "-" for r in runs)
        rows.append([str(t), *fused, chunked])
    return md_table(["T", "fused / bare: load 8-12, best of 2", "load 5-7, best of 4", "load 3-7, best of 2",
                     "chunked / bare (same three)"], rows)


# ---------------------------------------------------------------------------------------------------- streaming

STREAM_POLICIES = ("dense", "window", "sinks", "sinks_plain", "recompute")
MODE_WORDS = {"fast": "fast (exact blocks)", "token": "token by token", "batched windows": "batched windows"}


@renderer("stream-policies")
def render_stream_policies(source: Path) -> str:
    """docs/streaming.md's 1500-token table (``SOURCE/summary.json`` of ``sinkscope stream eval``)."""
    s = read_json(source / "summary.json")
    first_evicted = s.get("eviction_starts_at_position")
    rows = []
    for name in STREAM_POLICIES:
        p = s["policies"].get(name)
        if p is None:
            continue
        rows.append([name, f"{p['ppl']:.2f}", f"{p['ppl_after_eviction']:.2f}", MODE_WORDS.get(p["mode"], p["mode"]),
                     f"{p['tokens_per_s']:.1f}", f"{p['peak_mem_mb']:.2f}"])
    after = "ppl after eviction" + (f" (positions >= {first_evicted})" if first_evicted is not None else "")
    return md_table(["policy", "ppl (all tokens)", after, "mode", "tokens/s", "peak_mem_mb (KV)"], rows)


@renderer("stream-bench-decode")
def render_stream_bench_decode(source: Path) -> str:
    """docs/streaming.md's decode table: the ``decode`` section of ``bench/bench_streaming.py --out SOURCE``."""
    rows = []
    for r in read_json(source)["decode"]["rows"]:
        name = "generate (HF, DynamicCache)" if r["path"] == "generate" else f"stream eval token loop: {r['path']}"
        rows.append([name, f"{r['tokens_per_s_best']:.2f}", f"{r['tokens_per_s_median']:.2f}",
                     f"{r['generate_over_path']:.2f}"])
    return md_table(["path", "tokens/s (best of 3)", "tokens/s (median)", "generate / path (best)"], rows)


@renderer("stream-bench-fast")
def render_stream_bench_fast(source: Path) -> str:
    """docs/streaming.md's block-mode table: the ``fast`` section of the same JSON."""
    rows = [[r["policy"], str(r["tokens"]), f"{r['seconds']:.1f}", f"{r['tokens_per_s']:.1f}",
             "n/a" if r["over_generate_decode"] is None else f"{r['over_generate_decode']:.1f}",
             f"{r['peak_mem_mb']:.1f}"] for r in read_json(source)["fast"]["rows"]]
    return md_table(["policy", "tokens scored", "seconds", "tokens/s", "x generate decode", "peak KV MiB"], rows)


@renderer("stream-bench-lengths")
def render_stream_bench_lengths(source: Path) -> str:
    """docs/streaming.md's three lengths tables (tokens/s, KV MiB, RSS delta): the ``lengths`` section."""
    part = read_json(source)["lengths"]
    lengths, rows = part["lengths"], part["rows"]
    policies = list(dict.fromkeys(r["policy"] for r in rows))

    def one(key: str, fmt: str) -> str:
        body = []
        for p in policies:
            vals = {r["length"]: r[key] for r in rows if r["policy"] == p}
            body.append([p, *("n/a" if vals.get(n) is None else format(vals[n], fmt) for n in lengths)])
        return md_table(["policy", *(f"{n // 1024}k" for n in lengths)], body)

    return ("tokens/s (single-token decode at that stream length)\n\n" + one("tokens_per_s", ".0f")
            + "\nKV cache (MiB, exact tensor bytes; `n/a`: past the model's context)\n\n" + one("kv_mb", ".2f")
            + "\nRSS high-water delta above the policy's start (MiB)\n\n" + one("rss_delta_mb", ".1f"))


@renderer("repeat-scan")
def render_repeat_scan(source: Path) -> str:
    """docs/repetition.md's earlier-measurements scan table (``SOURCE/summary.csv`` of ``sinkscope repeat scan``)."""
    with open(source / "summary.csv", newline="") as f:
        rows = [[r["n"], r["words"], r["diverged"], f"{100 * float(r['rate']):.0f}%", f"{float(r['alpha_run_max']):.3f}",
                 f"{float(r['norm_ratio_max']):.2f}", f"{float(r['cos_first_max']):.2f}",
                 f"{float(r['sink_share_max']):.3f}"] for r in csv.DictReader(f)]
    return md_table(["N", "words", "diverged", "rate", "max over layers: alpha of a run position",
                     "residual norm / token 0", "cos to token 0", "share of heads sinking on it"], rows)


@renderer("repeat-circuit")
def render_repeat_circuit(source: Path) -> str:
    """docs/repetition.md's earlier circuit ranking: the first 12 components of ``SOURCE/circuit.json``."""
    rows = [[str(i), f"L{c['layer']}.{'N' if c['kind'] == 'neuron' else 'H'}{c['index']}", f"{c['first_act']:.1f}",
             f"{c['text_range']:.1f}", f"{c['effect_residual']:.3f}", f"{c['effect_attention']:.3f}",
             f"{c['fire_run']:.2f}", f"{c['fire_diverged']:.2f}", f"{c['fire_repeating']:.2f}"]
            for i, c in enumerate(read_json(source / "circuit.json")["components"][:12], start=1)]
    return md_table(["rank", "component", "mean abs. activation at token 0", "ordinary max", "residual peak removed",
                     "attention removed", "fire (all runs)", "fire (diverged)", "fire (repeating)"], rows)


DESIGN_CANDIDATES = (("p_k1_all", "old de-duplication (keep 1, every later query)"),
                     ("p_k1_gated", "keep 1, gated queries (**chosen**)"),
                     ("p_k1_gated_r8", "keep 1, gated, reach 8"),
                     ("p_k32_all", "keep 32, every later query"),
                     ("p_k32_gated", "keep 32, gated queries"))


@renderer("repeat-design-harm")
def render_repeat_design_harm(source: Path) -> str:
    """docs/repetition.md's DEV design-round harm table: per candidate patch the ``all`` and ``count`` rows of
    ``SOURCE/harm_dev_<patch>.csv`` (`repeat evaluate --no-divergence --harm-sets dev`)."""
    rows = []
    for name, label in DESIGN_CANDIDATES:
        with open(source / f"harm_dev_{name}.csv", newline="") as f:
            by = {r["family"]: r for r in csv.DictReader(f)}
        a, c = by["all"], by["count"]
        rows.append([label, f"{float(a['kl_inside']):.4f}", f"{float(a['kl_after']):.4f}", f"{float(a['kl_all']):.4f}",
                     f"{float(c['kl_all']):.4f}", f"{100 * float(a['ppl_change']):+.2f}%"])
    return md_table(["candidate", "KL inside stretches", "KL after", "KL overall", "counting family, KL overall",
                     "perplexity"], rows)


DESIGN_DIVERGENCE = (("divergence", "none", "none"), ("divergence", "p_k32_gated", "keep 32, gated"),
                     ("divergence_keep8", "p_k8_gated", "keep 8, gated"),
                     ("divergence", "p_k1_gated_r8", "keep 1, gated, reach 8"),
                     ("divergence", "p_k1_gated", "keep 1, gated (**chosen**)"))


@renderer("repeat-design-divergence")
def render_repeat_design_divergence(source: Path) -> str:
    """docs/repetition.md's design-round divergence table: diverged of words per candidate (``SOURCE/divergence``
    and, for keep 8 on the three hardest words, ``SOURCE/divergence_keep8``: each `repeat evaluate`'s summary.csv)."""
    rows = []
    for folder, variant, label in DESIGN_DIVERGENCE:
        r = _csv_row(source / folder / "summary.csv", variant=variant)
        with open(source / folder / "cells.csv", newline="") as f:
            words = list(dict.fromkeys(c["word"] for c in csv.DictReader(f)))
        note = f" (run on {', '.join(words)} only)" if folder == "divergence_keep8" else ""
        rows.append([label, f"{r['diverged']} of {r['words']}{note}"])
    return md_table(["candidate", "diverged"], rows)


DIRECTION_LAYERS = (0, 1, 2, 3, 5, 7, 8, 11, 12)


@renderer("repeat-direction")
def render_repeat_direction(source: Path) -> str:
    """docs/repetition.md's first-token-direction table (``SOURCE/direction_report.json`` of `repeat patch --method
    direction`): per layer the first token's, ordinary text's and the runs' projections and the score."""
    d = read_json(source / "direction_report.json")
    o, runs = d["ordinary"], d["run_projection"]
    rows = [[str(layer), f"{o['first'][layer]:.0f}", f"{o['median'][layer]:.0f}", f"{o['q90'][layer]:.0f}",
             f"{o['max'][layer]:.0f}", f"{sum(r[layer] for r in runs) / len(runs):.0f}", f"{d['scores'][layer]:.1f}"]
            for layer in DIRECTION_LAYERS]
    return md_table(["layer", "first token", "ordinary median", "ordinary q90", "ordinary max",
                     f"runs (mean of {len(runs)} words)", "score"], rows)


# ---------------------------------------------------------------------------------------------------- report


def _time_v(text: str, label: str) -> str:
    """One field of ``/usr/bin/time -v``'s output."""
    m = re.search(rf"^\s*{re.escape(label)}: (.+)$", text, re.M)
    if m is None:
        raise KeyError(label)
    return m[1].strip()


def _clock(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s" if m else f"{s} s"


@renderer("report-time")
def render_report_time(source: Path) -> str:
    """docs/report.md's time table: ``/usr/bin/time -v`` in ``SOURCE/stdout.txt``, sections from report.json."""
    out = (source / "stdout.txt").read_text()
    rep = read_json(source / "report.json")
    h, *rest = _time_v(out, "Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":")
    wall = float(h) * 60 + float(rest[0]) if len(rest) == 1 else float(h) * 3600 + float(rest[0]) * 60 + float(rest[1])
    cpu = float(_time_v(out, "User time (seconds)")) + float(_time_v(out, "System time (seconds)"))
    rss = int(_time_v(out, "Maximum resident set size (kbytes)")) / 1024 ** 2
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in rep["sections"]["model"]["data"]["timings_s"].items())
    return md_table(["wall", "inside the command", "CPU time", "share of one core", "peak RSS", "per section"],
                    [[_clock(wall), f"{rep['total_s']:.0f} s", f"{cpu:.0f} s",
                      _time_v(out, "Percent of CPU this job got"), f"{rss:.1f} GB", parts]])


@renderer("report-last-line")
def render_report_last_line(source: Path) -> str:
    """README's quote of the report's last line (``SOURCE/stdout.txt``)."""
    line = next(x for x in (source / "stdout.txt").read_text().splitlines() if x.startswith("Wrote "))
    return "```\n" + line.strip() + "\n```\n"


def _report_cpu_s(source: Path) -> str:
    out = (source / "stdout.txt").read_text()
    return f"{float(_time_v(out, 'User time (seconds)')) + float(_time_v(out, 'System time (seconds)')):.0f}"


def _report(section: str, *keys: Any, fmt: Callable[[Any], str] = str) -> Callable[[Path], str]:
    def get(source: Path) -> str:
        value: Any = read_json(source / "report.json")["sections"][section]["data"]
        for k in keys:
            value = value[k]
        return fmt(value)
    return get


def _f(spec: str) -> Callable[[Any], str]:
    return lambda x: format(x, spec)


REPORT = "docs/results/report"
REPORT_QUOTES = [
    (r"Sink_0\^0\.3 = (\S+) on text", _report("sinks", "kinds", "text", "sink0", fmt=_f(".2f")), "text Sink_0"),
    (r"on text, (\S+) on random tokens", _report("sinks", "kinds", "random", "sink0", fmt=_f(".2f")), "random Sink_0"),
    (r"\*\*(\S+) on a repeated token\*\*", _report("sinks", "kinds", "repeat", "sink0", fmt=_f(".2f")),
     "repeat Sink_0"),
    (r"the sink forms at layer (\d+) \(text\)", _report("sinks", "kinds", "text", "formation_layer"),
     "formation layer, text"),
    (r"the sink forms at layer \d+ \(text\) / (\d+) \(random\)", _report("sinks", "kinds", "random",
                                                                               "formation_layer"),
     "formation layer, random"),
    (r"token 0 is (\d+)x the median token after layer", _report("drains", "residual_peak", "ratio", fmt=_f(".0f")),
     "residual peak"),
    (r"value drain in (\d+) of 30 layers", _report("drains", "drain_layers"), "drain layers"),
    (r"\(median value-norm\s+ratio (\S+)\)", _report("drains", "value_ratio_median", fmt=_f(".2f")),
     "median value ratio"),
    (r"\(\|x\| up to (\d+), median", _report("drains", "massive_dims", 0, "max_value", fmt=_f(".0f")),
     "massive activation"),
    (r"\(\|x\| up to \d+, median \S+\), in (\d+) layers", _report("drains", "massive_dims", 0, "layers"),
     "massive activation layers"),
    (r"\(median residual norm (\d+) vs", _report("drains", "by_kind", "repeat", "median_other_norm", fmt=_f(".0f")),
     "repeat median residual norm"),
    (r"\(median residual norm \d+ vs (\d+) on text", _report("drains", "by_kind", "text", "median_other_norm",
                                                             fmt=_f(".0f")), "text median residual norm"),
    (r"(\d+) of 270 dormant on all domains", _report("dormant", "summary", "n_dormant"), "dormant heads"),
    (r"dormant on all domains, (\d+) active on all", _report("dormant", "summary", "n_active"), "active heads"),
    (r"active on all, (\d+) switch", _report("dormant", "summary", "n_switching"), "switching heads"),
    (r"\(alpha_0 (\S+) on code", _report("dormant", "top", 0, "alpha0_code", fmt=_f(".2f")), "L14H1 on code"),
    (r"on code, (\S+) on random\)", _report("dormant", "top", 0, "alpha0_random", fmt=_f(".2f")), "L14H1 on random"),
    (r"1/6 \(`book`\) at 512", lambda src: "1/6 (`book`) at 512" if _report("repetition", "rates", "512")(src)
     == str(1 / 6) else "other", "divergence at 512"),
    (r"removes (\d+)% of the first token's log residual peak",
     _report("repetition", "circuit", "top", 0, "effect_residual", fmt=lambda x: f"{100 * x:.0f}"), "circuit top"),
]


# ---------------------------------------------------------------------------------------------------- repetition

GRID_FORMS = ("instruct", "garak1", "garak3", "garak40", "garak-word1", "repeat-colon", "bare")


@renderer("repeat-grid")
def render_repeat_grid(source: Path) -> str:
    """docs/repetition.md's grid table from ``SOURCE/summary.csv`` (all 5208 answers); ``*`` marks the cells
    completed on the CPU (``cells_cpu_completion.jsonl``); a form whose every length gives the same counts is one
    row; the headline cell (instruct, N = 1024) is bold."""
    with open(source / "summary.csv", newline="") as f:
        rows = {(r["variant"], r["form"], int(r["n"])): r for r in csv.DictReader(f)}
    cpu = {(r["variant"], r["form"], r["n"]) for r in map(json.loads, (source / "cells_cpu_completion.jsonl")
                                                           .read_text().splitlines()) if r}
    lengths = sorted({n for _, _, n in rows})

    def cell(variant: str, form: str, n: int) -> str:
        r = rows[(variant, form, n)]
        text = f"{r['diverged']} ({100 * float(r['rate']):.0f}%)"
        return text + (" *" if (variant, form, n) in cpu else "")

    def cut(form: str, n: int) -> str:
        text = f"{100 * float(rows[('ours', form, n)]['relative_reduction']):.0f}%"
        return f"**{text}**" if (form, n) == ("instruct", 1024) else text

    out = []
    for form in GRID_FORMS:
        same = all(rows[(v, form, n)]["diverged"] == rows[(v, form, lengths[0])]["diverged"]
                   for v in ("none", "ours", "yona") for n in lengths)
        if same:
            n0 = lengths[0]
            out.append([form, f"{lengths[0]}-{lengths[-1]}", cell("none", form, n0) + " at each N",
                        cell("ours", form, n0) + " at each N", cut(form, n0), cell("yona", form, n0) + " at each N"])
            continue
        out += [[form, str(n), cell("none", form, n), cell("ours", form, n), cut(form, n), cell("yona", form, n)]
                for n in lengths]
    return md_table(["form", "N", "unpatched", "ours", "relative cut", "paper's patch"], out)


@renderer("repeat-headline")
def render_repeat_headline(source: Path) -> str:
    """docs/repetition.md's CPU headline table (``SOURCE/summary.csv``: instruct, N = 1024, 24 EVAL words)."""
    with open(source / "summary.csv", newline="") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    out = [[label, f"{rows[v]['diverged']} ({100 * float(rows[v]['rate']):.0f}%)", rows[v]["stopped"], rows[v]["repeats"]]
           for label, v in (("unpatched", "none"), ("our patch", "ours"))]
    return md_table(["EVAL words (the first 24 of `EVAL_WORDS`)", "diverged", "stopped (copies, then EOS)",
                     "repeats to the limit"], out)


HARM_FAMILIES = {"song": "songs and chants", "laughter": "laughter, interjections", "table": "tables",
                 "log": "logs and CSV", "code": "code", "count": "lists and counting", "emphasis": "emphasis"}


@renderer("repeat-harm")
def render_repeat_harm(source: Path) -> str:
    """docs/repetition.md's harm table per family (``SOURCE/harm_eval_ours.csv``; the ``all`` row in bold)."""
    def kl(x: str) -> str:
        return "0" if float(x) == 0 else f"{float(x):.4f}"

    def ppl(x: str) -> str:
        return "0" if float(x) == 0 else f"{100 * float(x):+.2f}%"

    out = []
    with open(source / "harm_eval_ours.csv", newline="") as f:
        for r in csv.DictReader(f):
            last = r["family"] == "all"
            b = (lambda c: f"**{c}**") if last else (lambda c: c)
            out.append([b(f"all {r['documents']}") if last else HARM_FAMILIES[r["family"]],
                        b(f"{r['gate_opened']} / {r['documents']}"), b(kl(r["kl_inside"])), b(kl(r["kl_after"])),
                        b(kl(r["kl_all"])), f"{float(r['nll_after_original']):.3f} -> {float(r['nll_after_patched']):.3f}",
                        b(ppl(r["ppl_change"])), f"{float(r['top1_after']):.3f}"])
    return md_table(["family", "documents where the gate opened", "KL inside the stretch", "KL after it", "KL overall",
                     "NLL after (original -> patched)", "perplexity", "top-1 agreement after"], out)


@renderer("circuit-bench")
def render_circuit_bench(source: Path) -> str:
    """docs/repetition.md's phase table of ``python bench/bench_circuit.py`` (``SOURCE`` = its JSON)."""
    out = [[r["phase"], f"{r['original_wall_s']:.1f}", f"{r['original_cpu_s']:.1f}", f"{r['fast_wall_s']:.1f}",
            f"{r['fast_cpu_s']:.1f}", f"{r['original_cpu_s'] / r['fast_cpu_s']:.1f}x"] for r in read_json(source)["rows"]]
    return md_table(["phase", "main wall s", "main CPU s", "fast wall s", "fast CPU s", "ratio (CPU)"], out)


#: tables checked where they stand, without markers (documents other wings own or reorganise): (documents the
#: table may stand in, renderer, source); the table is found by the first line of its rendering, its header
LOCATED_TABLES = [
    (("docs/repetition.md",), "repeat-grid", "docs/results/repeat_grid_h100"),
    (("docs/repetition.md",), "repeat-headline", "docs/results/repeat_eval_cpu/headline"),
    (("docs/repetition.md",), "repeat-harm", "docs/results/repeat_eval_cpu/text"),
    (("docs/repetition.md",), "circuit-bench", "bench/results/circuit.json"),
    (BENCH_DOCS, "profile-quiet", "bench/results/profile_quiet.json"),
    (BENCH_DOCS, "profile-loads", "bench/results/profile.json"),
    (BENCH_DOCS, "profile-parts", "bench/results/profile.json"),
    (BENCH_DOCS, "profile-fresh", "bench/results/profile.json"),
]


def located_table(text: str, header: str) -> str | None:
    """The Markdown table in ``text`` whose first line is ``header`` (through its last ``|`` line), or None."""
    i = text.find(header + "\n")
    if i < 0:
        return None
    lines = []
    for line in text[i:].splitlines():
        if not line.startswith("|"):
            break
        lines.append(line)
    return "\n".join(lines) + "\n"


@renderer("stream-run")
def render_stream_run(source: Path) -> str:
    """One ``stream eval`` run in numbers: per policy, tokens scored, seconds, tokens/s, peak K/V (``summary.json``),
    and the process's wall and CPU time, share of a core and maximum RSS (``/usr/bin/time -v`` in ``stdout.txt``)."""
    s = read_json(source / "summary.json")
    out = (source / "stdout.txt").read_text()
    cpu = float(_time_v(out, "User time (seconds)")) + float(_time_v(out, "System time (seconds)"))
    wall = _time_v(out, "Elapsed (wall clock) time (h:mm:ss or m:ss)")
    rss = int(_time_v(out, "Maximum resident set size (kbytes)")) / 1024 ** 2
    rows = [[name, str(p["tokens"]), f"{p['seconds']:.0f}", f"{p['tokens_per_s']:.1f}", f"{p['peak_mem_mb']:.2f}"]
            for name, p in s["policies"].items()]
    table = md_table(["policy", "tokens scored", "seconds", "tokens/s", "peak K/V MiB"], rows)
    return table + (f"\nWhole process: {wall} wall, {cpu:.0f} s CPU ({_time_v(out, 'Percent of CPU this job got')} "
                    f"of a core), maximum RSS {rss:.2f} GB (model included).\n")


@renderer("stream-ranges")
def render_stream_ranges(source: Path) -> str:
    """docs/streaming.md's 64k table: perplexity per position range of one policy (``SOURCE/ranges.json``, made by
    ``tools/stream_ranges.py`` from the run's tokens.csv)."""
    ranges = read_json(source / "ranges.json")["ranges"]
    (policy, by_range), = ranges.items()
    keys = list(by_range)
    label = f"ppl, {policy} (4 + 1020, absolute positions)"

    def fmt(x: float) -> str:
        return f"{x:.1f}" if x >= 100 else f"{x:.2f}"

    return md_table(["positions", *keys], [[label, *(fmt(by_range[k]["ppl"]) for k in keys)]])


# ---------------------------------------------------------------------------------------------------- training


def _training_table(runs: Path, names: list[str]) -> str:
    """The output of ``sinkscope train table experiments/ RUNS --only NAME`` for a set of experiments
    (the package's formatting; several names, since one glob cannot pick e.g. the first lab runs)."""
    from sinkscope.training import table as tt

    experiments = ROOT / "experiments"
    header: list[str] = []
    rows: list[str] = []
    dynamics: list[str] = []
    texts: list[str] = []
    for name in names:
        lines = tt.results_table(experiments, runs, name).markdown.splitlines()
        header, rows = lines[:2], rows + [lines[2]]
        dyn = tt.dynamics_lines(experiments, runs, pattern=name)
        dynamics = dynamics or dyn[:2]
        dynamics += dyn[2:]
        texts += [x for x in tt.text_sink_lines(experiments, runs, pattern=name) if x]
    equal = []
    for ref_suffix, other_suffix in tt.EQUAL_LOSS_PAIRS:
        for other in names:
            if not other.endswith(other_suffix):
                continue
            ref = other.removesuffix(other_suffix) + ref_suffix
            if ref in names and all((runs / n / "final.json").is_file() for n in (ref, other)):
                a, b = tt.equal_loss(tt._rows(runs / ref), tt._rows(runs / other))
                equal += [f"Equal loss ({ref} vs {other}): loss {a['loss']:.3f} vs {b['loss']:.3f}; "
                          f"{tt._describe(ref_suffix[1:], a)}; {tt._describe(other_suffix[1:], b)}.", ""]
    out = [*header, *rows, "", *equal, *dynamics, *([""] + texts if texts else [])]
    return "\n".join(out).rstrip() + "\n"


def training_renderer(names: list[str]) -> Renderer:
    return lambda source: _training_table(source, names)


TRAINING_SETS = {
    "training-peak": ["bb-peak-adam", "bb-peak-relu-flat", "bb-peak-relu-nobos", "bb-peak-relu", "bb-peak-sgd"],
    "training-noslot": ["bb-noslot-kbias", "bb-noslot-sinktoken-long", "bb-noslot-sinktoken", "bb-noslot-softmax",
                        "bb-noslot-softmax1"],
    "training-signorm": ["bb-signorm-len32", "bb-signorm-len64"],
    "training-stdlib": ["lm-stdlib-sigmoid", "lm-stdlib-softmax"],
    "training-first": ["bb-kbias", "bb-relu-adam", "bb-sigmoid-norm", "bb-sigmoid", "bb-softmax-adam",
                       "bb-softmax-sgd", "bb-softmax1", "lm-kbias", "lm-sigmoid-norm", "lm-sigmoid",
                       "lm-softmax-nobos", "lm-softmax"],
}
for _name, _names in TRAINING_SETS.items():
    RENDERERS[_name] = training_renderer(_names)


@renderer("training-backed")
def render_training_backed(source: Path) -> str:
    """The list of training runs with committed metrics (``SOURCE/NAME/final.json``)."""
    runs = sorted(d.name for d in source.iterdir() if (d / "final.json").is_file())
    return ", ".join(f"`{r}`" for r in runs) + ".\n"


TRAINING_DOC = "docs/training.md"
TRAINING_RESULTS = "docs/results/training"


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def check_training_rows(texts: dict[str, str], root: Path = ROOT) -> list[str]:
    """Every committed training run's rows (its final row in the results table, its dynamics rows) must stand in
    docs/training.md as ``python -m sinkscope.training.table`` prints them from the committed metrics. A docs
    table with fewer columns (the first lab's dynamics table predates the absolute-norm column) is compared on the
    columns it has. Runs of a set that were not re-run are not checked (the doc says which)."""
    problems = []
    text = texts.get(TRAINING_DOC, "")
    runs = root / TRAINING_RESULTS
    doc_rows = [_cells(x) for x in text.splitlines() if x.startswith("| ")]
    for run in sorted(d.name for d in runs.iterdir() if (d / "final.json").is_file()) if runs.is_dir() else []:
        rendered = [x for x in _training_table(runs, [run]).splitlines()
                    if x.startswith(f"| {run} |") or x.startswith(f"| {run} (long")]
        for line in rendered:
            want = _cells(line)
            dynamics = want[1].isdigit()  # dynamics rows: (name, step, ...); the results row: (name, attention, ...)
            key = want[:2] if dynamics else want[:1]
            label = f"{run} step {want[1]}" if dynamics else f"{run} (final row)"
            same_key = [r for r in doc_rows if r[:len(key)] == key and (dynamics or len(r) == len(want))]
            if not same_key:
                problems.append(f"{TRAINING_DOC}: no row for {label} (results: {TRAINING_RESULTS}/{run})")
                continue
            for r in same_key:
                if r != want[:len(r)]:
                    problems.append(f"{TRAINING_DOC}: row {label} differs from {TRAINING_RESULTS}/{run}:\n"
                                    f"- docs:    | {' | '.join(r)} |\n+ results: {line}")
    problems += _equal_loss_problems(text, runs)
    return problems


def _equal_loss_lines(runs: Path) -> dict[str, str]:
    """The rendered "Equal loss (A vs B): ..." line of every pair whose two runs are committed, by its prefix."""
    names = sorted(d.name for d in runs.iterdir() if (d / "final.json").is_file()) if runs.is_dir() else []
    out = {}
    for line in _training_table(runs, names).splitlines():
        if line.startswith("Equal loss ("):
            out[line.split(":")[0]] = line
    return out


def _equal_loss_problems(text: str, runs: Path) -> list[str]:
    problems = []
    for prefix, want in _equal_loss_lines(runs).items():
        found = [x for x in text.splitlines() if x.startswith(prefix + ":")]
        if not found:
            problems.append(f"{TRAINING_DOC}: no line {prefix!r} (results: {TRAINING_RESULTS})")
        for line in found:
            if line != want:
                problems.append(f"{TRAINING_DOC}: {prefix} differs from {TRAINING_RESULTS}:\n- docs:    {line}\n"
                                f"+ results: {want}")
    return problems


def write_training_rows(text: str, root: Path = ROOT) -> str:
    """docs/training.md's text with every committed run's rows replaced by their rendering (on the columns each
    docs table has); rows of runs without committed results stay as they are."""
    runs = root / TRAINING_RESULTS
    if not runs.is_dir():
        return text
    lines = text.splitlines(keepends=True)
    for run in sorted(d.name for d in runs.iterdir() if (d / "final.json").is_file()):
        for line in _training_table(runs, [run]).splitlines():
            if not (line.startswith(f"| {run} |") or line.startswith(f"| {run} (long")):
                continue
            want = _cells(line)
            dynamics = want[1].isdigit()
            key = want[:2] if dynamics else want[:1]
            for i, doc_line in enumerate(lines):
                if not doc_line.startswith("| "):
                    continue
                r = _cells(doc_line)
                if r[:len(key)] == key and (dynamics or len(r) == len(want)):
                    lines[i] = "| " + " | ".join(want[:len(r)]) + " |\n"
    for prefix, want in _equal_loss_lines(runs).items():
        lines = [want + "\n" if x.startswith(prefix + ":") else x for x in lines]
    return "".join(lines)


# ---------------------------------------------------------------------------------------------------- quotes


@dataclass(frozen=True)
class Quote:
    """A number quoted in prose: ``pattern`` (one group) must match once in ``doc``; the group must read
    ``expected(ROOT / source)``."""

    doc: str | tuple[str, ...]
    pattern: str
    source: str
    expected: Callable[[Path], str]
    what: str


def _final(run: str, key: str, fmt: str, index: int | None = None) -> Callable[[Path], str]:
    def get(source: Path) -> str:
        value = read_json(source / run / "final.json")[key]
        return format(value if index is None else value[index], fmt)
    return get


def _ranges(source: Path) -> dict[str, dict[str, float]]:
    """The only policy's per-range perplexities of a stream run (``SOURCE/ranges.json``)."""
    (by_range,) = read_json(source / "ranges.json")["ranges"].values()
    return by_range


def _mean(values: Any) -> float:
    """A number, or the mean of a list (per-head values of one layer, as ``training.table`` averages them)."""
    return sum(values) / len(values) if isinstance(values, list) else values


def _row(run: str, step: int) -> Callable[[Path], dict[str, Any]]:
    """A run's metrics row at ``step`` (``SOURCE/RUN/metrics.jsonl``)."""
    def get(source: Path) -> dict[str, Any]:
        rows = [json.loads(x) for x in (source / run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        return next(r for r in rows if r["step"] == step)
    return get


def _grid_copies(form: str, n: int, variant: str, word: str) -> Callable[[Path], str]:
    def get(source: Path) -> str:
        with gzip.open(source / "cells.jsonl.gz", "rt") as f:
            for line in f:
                r = json.loads(line)
                if (r["form"], r["n"], r["variant"], r["word"]) == (form, n, variant, word):
                    return str(r["copies"])
        raise KeyError((form, n, variant, word))
    return get


def _stream(policy: str, key: str, fmt: str) -> Callable[[Path], str]:
    return lambda source: format(read_json(source / "summary.json")["policies"][policy][key], fmt)


def _profile_ratio(source: Path) -> str:
    """Chunked statistics over the first pass, min-max over lengths, of bench/results/profile.json."""
    ratios = [r["chunked_stats_s"] / r["fused_parts"]["first_pass_s"] for r in read_json(source)["in_process"]]
    return f"{min(ratios):.1f}-{max(ratios):.1f}x"


def _csv_row(path: Path, **match: str) -> dict[str, str]:
    """The first row of the CSV at ``path`` whose columns equal ``match``."""
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if all(row[k] == v for k, v in match.items()):
                return row
    raise KeyError((str(path), match))


def _csv_value(name: str, key: str, fmt: Callable[[float], str], **match: str) -> Callable[[Path], str]:
    """``fmt`` of column ``key`` of the matching row of ``SOURCE/name``."""
    return lambda source: fmt(float(_csv_row(source / name, **match)[key]))


def _percent(x: float) -> str:
    return f"{100 * x:.0f}%"


def _signed_percent(x: float) -> str:
    return f"{100 * x:+.2f}%"


def _json_value(name: str, keys: tuple[str, ...], fmt: Callable[[float], str]) -> Callable[[Path], str]:
    def get(source: Path) -> str:
        value: Any = read_json(source / name)
        for k in keys:
            value = value[k]
        return fmt(value)
    return get


def _load_column(source: Path, column: int) -> list[float]:
    """One numeric column of ``bench_load.py``'s printed table (``SOURCE/stdout.txt``), first load then cached:
    1 = seconds, 3 = CPU seconds."""
    rows = re.findall(r"^\|[^|]+((?:\| [\d.]+ )+)\|", (source / "stdout.txt").read_text(), re.M)
    return [float(r.split("|")[column].strip()) for r in rows]


def _load_times(source: Path) -> list[float]:
    """Seconds per load: first, then cached."""
    return _load_column(source, 1)


def _load_cpu(source: Path) -> list[float]:
    """CPU seconds per load (the table's last column): first, then cached."""
    return _load_column(source, 3)


def _parity(source: Path, setup: str) -> dict[str, Any]:
    return next(r for r in read_json(source)["rows"] if r["setup"] == setup)


def _sci(x: float) -> str:
    """1.19e-07 -> ``1.2e-7`` (the docs' way of writing small numbers)."""
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


YONA = "docs/results/repeat_eval_cpu/patches/yona"


def _yona(source: Path) -> dict[str, Any]:
    return read_json(source / "yona_report.json")


CHAT_FORMS = ("instruct", "garak1", "garak3", "garak40", "garak-word1")


def _chat_cut_range(source: Path) -> str:
    """min-max of our patch's relative cut over the chat forms and every N of the grid's summary."""
    with open(source / "summary.csv", newline="") as f:
        cuts = [float(r["relative_reduction"]) for r in csv.DictReader(f)
                if r["variant"] == "ours" and r["form"] in CHAT_FORMS]
    return f"{100 * min(cuts):.0f}-{100 * max(cuts):.0f}%"


def _kv_row(method: str, budget: float, key: str, fmt: str) -> Callable[[Path], str]:
    """One row's value of a `kv eval` summary (``SOURCE/summary.json``)."""
    def get(source: Path) -> str:
        (row,) = [r for r in read_json(source / "summary.json")["rows"]
                  if r["method"] == method and r["budget"] == budget]
        return format(row[key], fmt)
    return get


def _stream_after_eviction(source: Path) -> str:
    """README's streaming bullet: the after-eviction perplexities of ``SOURCE/summary.json``, to one decimal."""
    p = read_json(source / "summary.json")["policies"]
    words = (("window", "window-only"), ("sinks", "sinks + window"), ("recompute", "recompute"), ("dense", "dense"))
    return ", ".join(f"{label} {p[name]['ppl_after_eviction']:.1f}" for name, label in words)


CIRCUIT_CPU = "docs/results/repeat_circuit_cpu"
STREAM_BENCH = "docs/results/streaming/bench/bench_streaming.json"
STREAM_BENCH_EXACT = "docs/results/streaming/bench/bench_streaming_exact.json"


def _bench_length(source: Path, policy: str, length: int) -> float:
    """tokens/s of one policy at one stream length in the ``lengths`` section of ``bench_streaming.py``'s JSON."""
    (row,) = [r for r in read_json(source)["lengths"]["rows"] if r["policy"] == policy and r["length"] == length]
    return float(row["tokens_per_s"])


def _kv_best_compressing_press(source: Path) -> str:
    """The lowest 25% stream KL of the kvpress presses that really store about 25% of the bytes (not DuoAttention
    on-the-fly, which keeps the full cache) in ``SOURCE/summary.json``."""
    rows = [r for r in read_json(source / "summary.json")["rows"]
            if r["method"].startswith("kvpress:") and r["budget"] == 0.25 and r["bytes_fraction"] < 0.5]
    return format(min(r["stream_kl"] for r in rows), ".3f")


def _kv_minor_full_heads(source: Path) -> str:
    """How many of the ablated policy's full kv heads gain less than 0.5 nats of answer log-prob from being kept
    full (``SOURCE/ablation_heads.csv``: the 0.4-nat ceiling docs/kv_eval.md names)."""
    with open(source / "ablation_heads.csv", newline="") as f:
        return str(sum(1 for r in csv.DictReader(f) if r["base_state"] == "full" and float(r["gain_logp"]) < 0.5))


KV_EVAL = "docs/results/kv/eval_drop_error_policy"

QUOTES: list[Quote] = [
    Quote("README.md", r"At 50% of the dense cache's bytes it answers (\d+) of 3 passkey prompts", KV_EVAL,
          lambda src: format(round(3 * float(_kv_row("policy", 0.5, "passkey_acc", ".6f")(src))), "d"),
          "kv: policy passkey at 50% (3 prompts)"),
    Quote("README.md", r"uniform sinks \+ window at equal bytes: (\S+);", KV_EVAL, _kv_row("uniform", 0.5, "passkey_acc", ".2f"),
          "kv: uniform passkey at 50%"),
    Quote("README.md", r"random full heads: (\S+)\);", KV_EVAL, _kv_row("random", 0.5, "passkey_acc", ".2f"),
          "kv: random passkey at 50%"),
    Quote("README.md", r"stream KL (\S+) nats/token\s+against uniform's", KV_EVAL, _kv_row("policy", 0.25, "stream_kl", ".3f"),
          "kv: policy stream KL at 25%"),
    Quote("README.md", r"against uniform's (\S+) and random", KV_EVAL, _kv_row("uniform", 0.25, "stream_kl", ".3f"),
          "kv: uniform stream KL at 25%"),
    Quote("README.md", r"random heads' (\S+)\. The head-wise", KV_EVAL, _kv_row("random", 0.25, "stream_kl", ".3f"),
          "kv: random stream KL at 25%"),
    Quote("README.md", r"stores really fewer bytes \((\S+) of dense", KV_EVAL, _kv_row("policy", 0.25, "bytes_fraction", ".3f"),
          "kv: stored bytes at 25%"),
    Quote("README.md", r"stores 25% of the bytes \((\S+);", "docs/results/kv/peers_1536",
          _kv_row("policy", 0.25, "stream_kl", ".3f"), "kv: policy KL at 25%, 1536"),
    Quote("README.md", r"; uniform (\S+), kvpress's best", "docs/results/kv/peers_1536",
          _kv_row("uniform", 0.25, "stream_kl", ".3f"), "kv: uniform KL at 25%, 1536"),
    Quote("README.md", r"kvpress's best press (\S+)\)", "docs/results/kv/peers_1536", _kv_best_compressing_press,
          "kv: best compressing press KL at 25%, 1536"),
    Quote("README.md", r"SnapKV leads \((\S+)\)", "docs/results/kv/peers_current",
          _kv_row("kvpress:snapkv", 0.25, "stream_kl", ".3f"), "kv: SnapKV KL at 25%, 1024"),
    Quote("README.md", r"stream KL rises to (\S+)\.", "docs/results/kv/eval_ablation_policy",
          _kv_row("policy", 0.25, "stream_kl", ".3f"), "kv: ablation-ranked KL"),
    Quote("README.md", r"decodes at (\S+)x a dense `DynamicCache`", "bench/results/kv_cache.json",
          lambda src: format(next(r for r in read_json(src)["rows"] if r["budget"] == 0.25)["decode_time_ratio"], ".2f"),
          "kv: decode ratio at 25%"),
    Quote("README.md", r"misjudges: (\d+) of the 13 full heads barely matter", "docs/results/kv/ablation_25",
          _kv_minor_full_heads, "kv: full heads that barely matter"),
    *[Quote("docs/report.md", pattern, REPORT, fn, "report: " + what) for pattern, fn, what in REPORT_QUOTES],
    Quote("README.md", r"The report\s+took (\d+) s of CPU time", REPORT, _report_cpu_s, "report CPU time"),
    Quote("README.md", r"first evicts \(positions >= 257\): (window-only \S+, sinks \+ window \S+, recompute \S+, dense \S+)\.",
          "docs/results/streaming/1500", _stream_after_eviction, "streaming: after-eviction perplexities"),
    Quote("docs/streaming.md", r"the terminal output\): (\S+) wall, \d+ s CPU", "docs/results/streaming/1500",
          lambda src: _time_v((src / "stdout.txt").read_text(), "Elapsed (wall clock) time (h:mm:ss or m:ss)")
          .split(".")[0], "streaming 1500: wall time"),
    Quote("docs/streaming.md", r"the terminal output\): \S+ wall, (\d+) s CPU", "docs/results/streaming/1500",
          lambda src: f"{float(_time_v((src / 'stdout.txt').read_text(), 'User time (seconds)')):.0f}",
          "streaming 1500: CPU time"),
    Quote("docs/repetition.md", r", (\d+ min \d+ s) wall for all five on one core\)", "docs/results/repeat_design_dev",
          lambda src: (lambda m, sec: f"{m} min {round(float(sec))} s")(*_time_v(
              (src / "stdout.txt").read_text(), "Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":")),
          "design round: wall time"),
    Quote("docs/repetition.md", r"top 8 per layer by \|a_0\| x \|\|W_down\[:, j\]\|\|: (\d+) neurons in layers", CIRCUIT_CPU,
          lambda src: str(len(read_json(src / "circuit.json")["components"])), "circuit: candidates"),
    Quote("docs/repetition.md", r"neurons in layers\s+(\[[\d, ]+\])\)", CIRCUIT_CPU,
          lambda src: str(sorted({c["layer"] for c in read_json(src / "circuit.json")["components"]})),
          "circuit: candidate layers"),
    Quote("docs/repetition.md", r"mean log residual peak \(baseline\s+(\S+)\)", CIRCUIT_CPU,
          lambda src: f"{read_json(src / 'circuit.json')['baseline']['log_residual_ratio']:.2f}", "circuit: baseline peak"),
    Quote("docs/repetition.md", r"baseline alpha_0 = (\S+)\)", CIRCUIT_CPU,
          lambda src: f"{read_json(src / 'circuit.json')['baseline']['alpha0']:.3f}", "circuit: baseline alpha_0"),
    Quote("docs/streaming.md", r"met for every policy \(worst (\S+)x, `dense`", STREAM_BENCH,
          lambda src: f"{max(r['generate_over_path'] for r in read_json(src)['decode']['rows'][1:]):.2f}",
          "streaming bench: worst token-loop ratio"),
    Quote("docs/streaming.md", r"the whole stream is scored (\S+)x faster than\s+decoding it in this run", STREAM_BENCH,
          lambda src: "{:.0f}-{:.0f}".format(*(lambda v: (min(v), max(v)))(
              [r["over_generate_decode"] for r in read_json(src)["fast"]["rows"]])), "streaming bench: block mode"),
    Quote("docs/streaming.md", r"checked\), (\d+) s on the shared", STREAM_BENCH,
          lambda src: f"{read_json(src)['seconds']:.0f}", "streaming bench: run time"),
    Quote("docs/streaming.md", r"\*\*missed\s+in this run\*\* \((\d+ / \d+ = \S+)x;", STREAM_BENCH,
          lambda src: (lambda d, k: f"{d:.0f} / {k:.0f} = {d / k:.2f}")(_bench_length(src, "dense", 2048),
                                                                        _bench_length(src, "sinks", 2048)),
          "streaming bench: dense / sinks at 2k"),
    Quote("docs/streaming.md", r"its decode speed falls \((\d+ -> \d+) tokens/s from 2k to\s+8k\)", STREAM_BENCH,
          lambda src: f"{_bench_length(src, 'dense', 2048):.0f} -> {_bench_length(src, 'dense', 8192):.0f}",
          "streaming bench: dense 2k -> 8k"),
    Quote("README.md", r"and (\S+) cuts in every chat form at every N", "docs/results/repeat_grid_h100", _chat_cut_range,
          "grid: relative cut of ours over the chat forms and lengths"),
    # the paper's patch as built by Yona et al.'s rules
    Quote("docs/repetition.md", r"on one-token inputs \(layers 0-14, the first half\):\s+(.+?); mean \+ 2 std",
          YONA, lambda src: ", ".join(f"**{v:.0f}**" if i == _yona(src)["sink_layer"]["layer"] else f"{v:.0f}"
                                      for i, v in enumerate(_yona(src)["sink_layer"]["mlp_norm"][:15])),
          "yona: first-half MLP norms"),
    Quote("docs/repetition.md", r"mean \+ 2 std of those = (\d+), first exceeded", YONA,
          lambda src: f"{_yona(src)['sink_layer']['threshold']:.0f}", "yona: threshold"),
    Quote("docs/repetition.md", r"Top scores `\|a\| \* \|\|W_down\[:, j\]\|\|` (\d+ and \d+)", YONA,
          lambda src: " and ".join(f"{n['score']:.0f}" for n in _yona(src)["neurons"][:2]), "yona: neuron scores"),
    Quote("docs/repetition.md", r"\(\|a\| at token 0:\s+(\d+ and \d+)\)", YONA,
          lambda src: " and ".join(f"{n['first_activation']:.0f}" for n in _yona(src)["neurons"][:2]),
          "yona: first activations"),
    Quote("docs/repetition.md", r"zeroing them at token 0 removes (\d+% and \d+%)", YONA,
          lambda src: " and ".join(f"{100 * n['peak_drop']:.0f}%" for n in _yona(src)["neurons"][:2]),
          "yona: peak removed"),
    # the GPU session's benchmark JSONs
    Quote(BENCH_DOCS, r"\| fused (\S+ / \S+ / \S+) the bare forward at 512 / 2048 / 8192 tokens",
          "bench/results/profile_cuda.json",
          lambda src: " / ".join(f"{r['fused_ratio']:.2f}x" for r in read_json(src)["in_process"]), "GPU fused ratios"),
    Quote(BENCH_DOCS, r"\(bare: (\S+ ms / \S+ ms / \S+ ms)\), chunked", "bench/results/profile_cuda.json",
          lambda src: " / ".join(f"{1000 * r['bare_s']:.0f} ms" for r in read_json(src)["in_process"]), "GPU bare"),
    Quote(BENCH_DOCS, r"\), chunked (\S+ / \S+ / \S+); GPU memory", "bench/results/profile_cuda.json",
          lambda src: " / ".join(f"{r['chunked_ratio']:.2f}x" for r in read_json(src)["in_process"]),
          "GPU chunked ratios"),
    Quote(BENCH_DOCS, r"fused vs chunked alpha within (\S+) \|", "bench/results/profile_cuda.json",
          lambda src: f"{max(r['fused_vs_chunked_max_abs']['alpha'] for r in read_json(src)['in_process']):.1e}"
          .replace("e-06", "e-6"), "GPU fused vs chunked alpha"),
    Quote(BENCH_DOCS, r"`generate` (\S+) tokens/s \(launch-bound", "bench/results/streaming_cuda.json",
          lambda src: f"{read_json(src)['decode']['rows'][0]['tokens_per_s_best']:.1f}", "GPU generate tokens/s"),
    Quote(BENCH_DOCS, r"the token loop (\S+) its time per token", "bench/results/streaming_cuda.json",
          lambda src: "{:.2f}-{:.2f}x".format(*(lambda v: (min(v), max(v)))(
              [r["generate_over_path"] for r in read_json(src)["decode"]["rows"][1:]])), "GPU token loop ratio"),
    Quote(BENCH_DOCS, r"CUDA fp32: worst (\S+) on alpha", "bench/results/device_parity_cuda.json",
          lambda src: _sci(_parity(src, "cuda fp32")["alpha"]), "device parity fp32 alpha"),
    Quote(BENCH_DOCS, r"on alpha, (\S+) relative on norms", "bench/results/device_parity_cuda.json",
          lambda src: _sci(max(_parity(src, "cuda fp32")[k] for k in ("value_norm", "residual_norm", "out_norm"))),
          "device parity fp32 norms"),
    Quote(BENCH_DOCS, r"CUDA bf16: (\S+) on alpha", "bench/results/device_parity_cuda.json",
          lambda src: _sci(_parity(src, "cuda bf16")["alpha"]), "device parity bf16 alpha"),
    Quote(BENCH_DOCS, r"on alpha, (\S+)% on value norms", "bench/results/device_parity_cuda.json",
          lambda src: f"{100 * _parity(src, 'cuda bf16')['value_norm']:.2f}", "device parity bf16 value norms"),
    # bench/bench_load.py
    Quote(BENCH_DOCS, r"write the safetensors cache\) (\S+) s; cached loads", "docs/results/load",
          lambda src: f"{_load_times(src)[0]:.1f}", "first load"),
    Quote(BENCH_DOCS, r"; cached loads (\S+ s and \S+ s)\.", "docs/results/load",
          lambda src: " and ".join(f"{t:.1f} s" for t in _load_times(src)[1:]), "cached loads"),
    Quote("README.md", r"so later loads take (\S+) the time of the first", "docs/results/load",
          lambda src: f"{max(_load_times(src)[1:]) / _load_times(src)[0]:.2f}x", "cached / first load"),
    Quote("README.md", r"Of these the\s+loads themselves used (\S+ s and \S+ s) of CPU", "docs/results/load",
          lambda src: " and ".join(f"{t:.1f} s" for t in _load_cpu(src)[1:]), "cached loads' CPU time"),
    # README's training bullet
    Quote("README.md", r"BOS becomes a sink \(Sink_0 (\S+);", TRAINING_RESULTS, _final("bb-softmax-adam", "sink_ratio", ".2f"),
          "bb-softmax-adam Sink_0"),
    Quote("README.md", r"BOS's value norm drains to (\S+)x the median", TRAINING_RESULTS,
          _final("bb-softmax-adam", "bos_value_norm", ".2f", 1), "bb-softmax-adam layer-1 value ratio"),
    Quote("README.md", r"BOS's residual after layer 0 is (\d+)x the median", TRAINING_RESULTS,
          _final("bb-peak-relu", "bos_residual_norm", ".0f", 0), "bb-peak-relu layer-0 residual ratio"),
    # docs/training.md's note on the re-run text LMs
    Quote(TRAINING_DOC, r"the re-run gives softmax\s+eval loss (\S+) \(1\.545 before\)", TRAINING_RESULTS,
          _final("lm-stdlib-softmax", "loss", ".3f"), "lm-stdlib-softmax final loss"),
    Quote(TRAINING_DOC, r"sigmoid (\S+) \(1\.611\) with Sink_0", TRAINING_RESULTS,
          _final("lm-stdlib-sigmoid", "loss", ".3f"), "lm-stdlib-sigmoid final loss"),
    Quote(TRAINING_DOC, r"with Sink_0 (\S+) and proxy \S+ \(0\.19 and", TRAINING_RESULTS,
          _final("lm-stdlib-sigmoid", "sink_ratio", ".2f"), "lm-stdlib-sigmoid Sink_0"),
    Quote(TRAINING_DOC, r"with Sink_0 \S+ and proxy (\S+) \(0\.19 and", TRAINING_RESULTS,
          _final("lm-stdlib-sigmoid", "sink_ratio_proxy", ".2f"), "lm-stdlib-sigmoid Sink_0 proxy"),
    Quote(TRAINING_DOC, r"sigmoid Sink_0 proxy (\S+) at equal loss \(re-run", TRAINING_RESULTS,
          _final("lm-stdlib-sigmoid", "sink_ratio_proxy", ".2f"), "lm-stdlib-sigmoid Sink_0 proxy (summary table)"),
    # docs/streaming.md's 64k prose
    Quote("docs/streaming.md", r"perplexity climbs from (\d+) to \d+ in the first 1k tokens beyond", "docs/results/streaming/64k",
          lambda src: f"{_ranges(src)['1025-8191']['ppl']:.0f}", "64k: ppl before the context's end"),
    Quote("docs/streaming.md", r"perplexity climbs from \d+ to (\d+) in the first 1k tokens beyond", "docs/results/streaming/64k",
          lambda src: f"{_ranges(src)['8192-9215']['ppl']:.0f}", "64k: ppl in the first 1k past the context"),
    Quote("docs/streaming.md", r"in the first 1k tokens beyond, (\d+) by 16k", "docs/results/streaming/64k",
          lambda src: f"{_ranges(src)['9216-16383']['ppl']:.0f}", "64k: ppl up to 16k"),
    Quote("docs/streaming.md", r"by 16k and over (\d+) after", "docs/results/streaming/64k",
          lambda src: "500" if min(_ranges(src)[k]["ppl"] for k in ("16384-32767", "32768-65535")) > 500 else "no",
          "64k: ppl past 16k"),
    # docs/training.md's prose on the re-run ReLU run
    Quote(TRAINING_DOC, r"BOS's residual after layer 0 grows to (\d+) \(\d+x the median token; re-run\)", TRAINING_RESULTS,
          _final("bb-peak-relu", "bos_residual_abs", ".0f", 0), "bb-peak-relu absolute residual (summary table)"),
    Quote(TRAINING_DOC, r"grows to \d+ \((\d+)x the median token; re-run\)", TRAINING_RESULTS,
          _final("bb-peak-relu", "bos_residual_norm", ".0f", 0), "bb-peak-relu residual ratio (summary table)"),
    Quote(TRAINING_DOC, r"grows from 11\.5 to \*\*(\d+)\*\*", TRAINING_RESULTS,
          _final("bb-peak-relu", "bos_residual_abs", ".0f", 0), "bb-peak-relu absolute residual"),
    Quote(TRAINING_DOC, r"to \*\*\d+\*\* \((\d+)x the median token\)", TRAINING_RESULTS,
          _final("bb-peak-relu", "bos_residual_norm", ".0f", 0), "bb-peak-relu residual ratio"),
    Quote(TRAINING_DOC, r"faster than linearly \((\d+ at 2k, \d+ at 4k, \d+ at 6k)\)", TRAINING_RESULTS,
          lambda src: ", ".join(f"{_row('bb-peak-relu', n)(src)['bos_residual_abs'][0]:.0f} at {n // 1000}k"
                                for n in (2000, 4000, 6000)), "bb-peak-relu residual by step"),
    Quote(TRAINING_DOC, r"layer 0's alpha_0 is (\S+)\)", TRAINING_RESULTS,
          lambda src: "{:.2f}".format(_mean(read_json(src / "bb-peak-relu" / "final.json")["bos_attention"][0])),
          "bb-peak-relu layer-0 alpha_0"),
    Quote(TRAINING_DOC, r"\(absolute \S+\) against (\S+ \(\d+\)), and layer 0", TRAINING_RESULTS,
          lambda src: "{:.1f} ({:.0f})".format(_row("bb-peak-relu", 2000)(src)["bos_residual_norm"][0],
                                               _row("bb-peak-relu", 2000)(src)["bos_residual_abs"][0]),
          "bb-peak-relu at step 2000"),
    Quote(TRAINING_DOC, r"it grows to (\d+)x by 8k steps", TRAINING_RESULTS,
          _final("bb-peak-relu", "bos_residual_norm", ".0f", 0), "bb-peak-relu ratio (first-lab section)"),
    Quote(TRAINING_DOC, r"the first lab's (\S+)x at 500 steps", TRAINING_RESULTS,
          _final("bb-relu-adam", "bos_residual_norm", ".2f", 0), "bb-relu-adam layer-0 residual ratio"),
    Quote(TRAINING_DOC, r"larger\* than with softmax \((\S+)x\)", TRAINING_RESULTS,
          _final("bb-relu-adam", "bos_residual_norm", ".2f", 0), "bb-relu-adam layer-0 residual ratio (first lab)"),
    Quote(TRAINING_DOC, r"A milder value shrinkage\s+\((\S+)x\) still appears", TRAINING_RESULTS,
          _final("bb-relu-adam", "bos_value_norm", ".2f", 1), "bb-relu-adam layer-1 value ratio"),
    Quote(TRAINING_DOC, r"\(excess loss (\S+) vs \S+ for softmax: slower\)", TRAINING_RESULTS,
          _final("bb-relu-adam", "excess_loss", ".2f"), "bb-relu-adam excess loss"),
    Quote(TRAINING_DOC, r"\(excess loss \S+ vs (\S+) for softmax: slower\)", TRAINING_RESULTS,
          _final("bb-softmax-adam", "excess_loss", ".2f"), "bb-softmax-adam excess loss"),
    # the H100 run of configs/gu-60m.yaml
    Quote("README.md", r"\| (\d+) steps \(\S+M byte tokens\) in", "docs/results/gu60m_h100",
          _json_value("final.json", ("step",), str), "gu-60m steps"),
    Quote("README.md", r"steps \((\S+)M byte tokens\) in", "docs/results/gu60m_h100",
          _json_value("final.json", ("tokens",), lambda x: f"{x / 1e6:.1f}"), "gu-60m tokens"),
    Quote("README.md", r"byte tokens\) in (\d+) s, held-out", "docs/results/gu60m_h100",
          _json_value("final.json", ("wall_time_s",), lambda x: f"{x:.0f}"), "gu-60m wall"),
    Quote("README.md", r"held-out loss (\S+) nats/byte, no sink yet", "docs/results/gu60m_h100",
          _json_value("final.json", ("loss",), lambda x: f"{x:.2f}"), "gu-60m loss"),
    Quote("README.md", r"no sink yet \(Sink_0 (\S+), first-token attention", "docs/results/gu60m_h100",
          _json_value("final.json", ("sink_ratio",), lambda x: f"{x:.3f}"), "gu-60m Sink_0"),
    Quote("README.md", r"first-token attention <= (\S+)% per head", "docs/results/gu60m_h100",
          _json_value("final.json", ("bos_attention",), lambda a: f"{100 * max(max(r) for r in a):.2f}"),
          "gu-60m max first-token attention"),
    Quote(BENCH_DOCS, r"The chunked statistics cost (\S+) the first pass", "bench/results/profile.json", _profile_ratio,
          "chunked statistics over the first pass, range over lengths"),
    # README's repetition bullet: the CPU headline run, the CPU harm run, the GPU grid
    Quote("README.md", r"128-token answers judged whole, on EVAL words that no design\s+choice has seen\): (\d+%) of 24",
          "docs/results/repeat_eval_cpu/headline", _csv_value("summary.csv", "rate", _percent, variant="none"),
          "unpatched divergence, headline run"),
    Quote("README.md", r"for queries inside the repetition only\) brings it to (\d+%)",
          "docs/results/repeat_eval_cpu/headline", _csv_value("summary.csv", "rate", _percent, variant="ours"),
          "patched divergence, headline run"),
    Quote("README.md", r"\((\d+%) relative cut; target >= 80%\)",
          "docs/results/repeat_eval_cpu/headline", _csv_value("summary.csv", "relative_reduction", _percent,
                                                              variant="ours"), "relative cut, headline run"),
    Quote("README.md", r"on all 62 EVAL words \(the full grid, run on a GPU\) (\d+%) ->",
          "docs/results/repeat_grid_h100", _csv_value("summary.csv", "rate", _percent, variant="none",
                                                     form="instruct", n="1024"), "grid, instruct N=1024, unpatched"),
    Quote("README.md", r"on all 62 EVAL words \(the full grid, run on a GPU\) \d+% -> (\d+%)",
          "docs/results/repeat_grid_h100", _csv_value("summary.csv", "rate", _percent, variant="ours",
                                                     form="instruct", n="1024"), "grid, instruct N=1024, ours"),
    Quote("README.md", r"emphasis\) mean KL (\S+) nats/token", "docs/results/repeat_eval_cpu/text",
          _csv_value("harm_eval_ours.csv", "kl_all", lambda x: f"{x:.4f}", family="all"), "harm KL, all 35 docs"),
    Quote("README.md", r"nats/token and perplexity (\S+)\s+\(targets", "docs/results/repeat_eval_cpu/text",
          _csv_value("harm_eval_ours.csv", "ppl_change", _signed_percent, family="all"), "harm ppl, all 35 docs"),
    Quote("README.md", r"the counting prompts cost most, KL (\S+)\)", "docs/results/repeat_eval_cpu/text",
          _csv_value("harm_eval_ours.csv", "kl_all", lambda x: f"{x:.3f}", family="count"), "harm KL, counting"),
    Quote("README.md", r"is nearly free \(KL (\S+)\)", "docs/results/repeat_eval_cpu/text",
          _json_value("evaluation.json", ("side_effects", "yona", "text", "kl"), lambda x: f"{x:.0e}".replace("e-05", "e-5")),
          "the paper's patch, WikiText KL"),
    Quote("docs/repetition.md", r"frog and goat leave after 38 and (\d+) clean copies",
          "docs/results/repeat_grid_h100", _grid_copies("instruct", 2048, "ours", "goat"),
          "goat's clean copies before leaving (instruct, N = 2048, ours)"),
    Quote("docs/repetition.md", r"frog and goat leave after (\d+) and \d+ clean copies",
          "docs/results/repeat_grid_h100", _grid_copies("instruct", 2048, "ours", "frog"),
          "frog's clean copies before leaving (instruct, N = 2048, ours)"),
]


# ---------------------------------------------------------------------------------------------------- checking


def render_text(text: str, root: Path = ROOT) -> str:
    """``text`` with every marked block replaced by its renderer's output."""
    def sub(m: re.Match[str]) -> str:
        body = RENDERERS[m["name"]](root / m["source"])
        return f"<!-- table: {m['name']} {m['source']} -->\n{body}<!-- /table -->"
    return MARKER.sub(sub, text)


def check_text(label: str, text: str, root: Path = ROOT) -> list[str]:
    """Problems of one document's marked tables: unknown renderer, missing results, or a block that differs
    from its rendering (with a unified diff)."""
    problems = []
    for m in MARKER.finditer(text):
        name, source = m["name"], m["source"]
        if name not in RENDERERS:
            problems.append(f"{label}: unknown table renderer {name!r}")
            continue
        if not (root / source.split("#")[0]).exists():
            problems.append(f"{label}: table {name}: results {source} not found")
            continue
        want = RENDERERS[name](root / source)
        if m["body"] != want:
            diff = "\n".join(difflib.unified_diff(m["body"].splitlines(), want.splitlines(), "docs", "results",
                                                  lineterm="", n=0))
            problems.append(f"{label}: table {name} ({source}) differs from its results:\n{diff}")
    return problems


def flat(text: str) -> str:
    """``text`` with every run of whitespace (line breaks and indentation included) as one space, so that a quote's
    pattern does not depend on where the prose is wrapped."""
    return " ".join(text.split())


def check_quotes(texts: dict[str, str], root: Path = ROOT, quotes: list[Quote] | None = None) -> list[str]:
    """Problems of the quoted numbers: a pattern that does not match exactly once, or a number that differs."""
    problems = []
    for q in QUOTES if quotes is None else quotes:
        docs = (q.doc,) if isinstance(q.doc, str) else q.doc
        label = " or ".join(docs)
        found = [m for d in docs if d in texts for m in re.findall(q.pattern, flat(texts[d]))]
        if len(found) != 1:
            problems.append(f"{label}: {q.what}: pattern {q.pattern!r} matched {len(found)} times, expected once")
            continue
        try:
            want = q.expected(root / q.source)
        except (OSError, KeyError, IndexError, ValueError, TypeError, StopIteration) as e:
            problems.append(f"{label}: {q.what}: cannot read it from {q.source}: {e!r}")
            continue
        if found[0] != want:
            problems.append(f"{label}: {q.what}: the docs say {found[0]}, {q.source} gives {want}")
    return problems


def check_located(texts: dict[str, str], root: Path = ROOT,
                  tables: list[tuple[tuple[str, ...], str, str]] | None = None) -> list[str]:
    """Problems of the tables checked where they stand (``LOCATED_TABLES``): not found in any of its documents,
    or different from its rendering."""
    problems = []
    for docs, name, source in LOCATED_TABLES if tables is None else tables:
        want = RENDERERS[name](root / source)
        header = want.splitlines()[0]
        found = [(d, t) for d in docs if d in texts and (t := located_table(texts[d], header)) is not None]
        if not found:
            problems.append(f"{' or '.join(docs)}: table {name} (header {header!r}) not found")
            continue
        for doc, table in found:
            if table != want:
                diff = "\n".join(difflib.unified_diff(table.splitlines(), want.splitlines(), "docs", "results",
                                                      lineterm="", n=0))
                problems.append(f"{doc}: table {name} ({source}) differs from its results:\n{diff}")
    return problems


def read_docs(root: Path = ROOT) -> dict[str, str]:
    """The checked documents that exist, by path relative to ``root``."""
    return {d: (root / d).read_text() for d in DOCS if (root / d).is_file()}


def check_all(root: Path = ROOT, texts: dict[str, str] | None = None) -> list[str]:
    texts = read_docs(root) if texts is None else texts
    problems = [p for label, text in texts.items() for p in check_text(label, text, root)]
    return problems + check_located(texts, root) + check_training_rows(texts, root) + check_quotes(texts, root)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="rewrite the marked tables from the results")
    a = p.parse_args(argv)
    if a.write:
        for d in read_docs():
            path = ROOT / d
            old = path.read_text()
            new = render_text(old)
            if d == TRAINING_DOC:
                new = write_training_rows(new)
            if new != old:
                path.write_text(new)
                print(f"rewrote tables in {d}")
    problems = check_all()
    for prob in problems:
        print(prob)
    print(f"{len(problems)} problem(s)" if problems else "docs tables and quoted numbers match their results")
    return 1 if problems else 0


# --- yona ---
# Yona et al. at scale (issue 19, item 5): `repeat sinkrun` and `repeat cluster --defence`, docs/repetition.md.
# (Before the __main__ guard, so that `python tools/docs_tables.py` has these renderers registered too.)

#: layers of SmolLM2-135M (30 layers; the sink layer by Yona et al.'s rule is 11) whose distance to the one-token
#: sequence the table shows
YONA_LAYERS = (0, 5, 11, 29)


def _yona_summary(source: Path) -> list[dict[str, Any]]:
    return read_json(source / "summary.json")["summary"]


def _share(x: Any) -> str:
    return "n/a" if x is None else f"{x:.3f}"


@renderer("yona-sinkrun")
def render_yona_sinkrun(source: Path) -> str:
    """Per form and N (``SOURCE/summary.json`` of `repeat sinkrun`): words with a sink copy, the largest share of
    sinking heads on a counted copy, token 0's Sink_0, the last copy's distance to the one-token sequence at
    `YONA_LAYERS`, and the norm ratio at layers 5 and 11."""
    rows = []
    for r in _yona_summary(source):
        d, nr = r["distance_by_layer"], r["norm_ratio_by_layer"]
        rows.append([r["form"], str(r["n"]), f"{r['words_with_sink_copy']} / {r['words']}", _share(r["mean_max_share"]),
                     f"{r['mean_sink0']:.3f}", *(f"{d[l]:.2f}" for l in YONA_LAYERS), f"{nr[5]:.2f}",
                     f"{nr[11]:.2f}"])
    return md_table(["form", "N", "words with a sink copy", "largest share on a copy", "Sink_0 (token 0)",
                     *(f"distance, layer {l}" for l in YONA_LAYERS), "norm ratio, layer 5", "norm ratio, layer 11"],
                    rows)


@renderer("yona-paper-words")
def render_yona_paper_words(source: Path) -> str:
    """Per word, form and N (``SOURCE/cells.csv`` of `repeat sinkrun` on the paper's words): first sink copy,
    largest share on a counted copy, Sink_0, distance at the last layer."""
    with open(source / "cells.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out = [[r["word"], r["form"], r["n"], r["first_sink_copy"] or "none",
            "n/a" if r["max_share"] == "" else f"{float(r['max_share']):.3f}", f"{float(r['sink0']):.3f}",
            f"{float(r['distance_min']):.2f}", f"{float(r['distance_last_layer']):.2f}"]
           for r in rows if int(r["n"]) >= 256]
    return md_table(["word", "form", "N", "first sink copy", "largest share on a copy", "Sink_0 (token 0)",
                     "distance, closest layer", "distance, last layer"], out)


YONA_KINDS = {"cluster": "best cluster's tokens", "repeat": "copies of the word", "random": "random tokens"}


@renderer("yona-cluster")
def render_yona_cluster(source: Path) -> str:
    """Per kind of sequence and variant (``SOURCE/rates.csv`` of `repeat cluster --defence`): diverged of words,
    the rate with its Wilson 95% interval, stopped and repeating answers, and the scoring patch's firing."""
    with open(source / "rates.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    label = {"none": "unpatched"}
    out = []
    for r in rows:
        out.append([f"{YONA_KINDS[r['kind']]} (N = {r['n']})", label.get(r["variant"], f"shipped patch ({r['variant']})"),
                    f"{r['diverged']} / {r['words']}",
                    f"{100 * float(r['rate']):.0f}% [{100 * float(r['ci_low']):.0f}%, {100 * float(r['ci_high']):.0f}%]",
                    r["stopped"], r["repeats"], f"{float(r['sink_fire']):.2f}"])
    return md_table(["sequence before the 16 tail copies", "answered", "diverged", "rate [Wilson 95%]", "stopped",
                     "repeats to the limit", "first-token projection (1 = top of ordinary range)"], out)


YONA_SINKRUN = "docs/results/repeat_yona/sinkrun_eval"


def _yona_row(form: str, n: int) -> Callable[[Path], dict[str, Any]]:
    return lambda src: next(r for r in _yona_summary(src) if r["form"] == form and r["n"] == n)


def _yona_at(form: str, n: int, key: str, fmt: str, layer: int | None = None) -> Callable[[Path], str]:
    """One summary value of (form, N) (a per-layer list's entry at ``layer``), formatted."""
    def get(src: Path) -> str:
        v = _yona_row(form, n)(src)[key]
        return format(v if layer is None else v[layer], fmt)
    return get


def _yona_max_cell_share(src: Path) -> str:
    with open(src / "cells.csv", newline="") as f:
        return f"{max(float(r['max_share']) for r in csv.DictReader(f) if r['max_share']):.3f}"


def _yona_extreme(key: str, layers: slice, pick: Callable[..., float], fmt: str) -> Callable[[Path], str]:
    """``pick`` (min or max) of a per-layer list over ``layers`` and every (form, N)."""
    return lambda src: format(pick(pick(r[key][layers]) for r in _yona_summary(src)), fmt)


_C, _I = "`Repeat:` form", "instruction form"
YONA_QUOTES = [
    (r"does a counted copy collect more than a share of (\S+) of the heads", _yona_max_cell_share, "largest share"),
    (r"whose Sink_0 falls from (\S+) to \S+ \(N = 1 -> 512\)", _yona_at("repeat-colon", 1, "mean_sink0", ".3f"),
     "Sink_0 Repeat: N=1"),
    (r"whose Sink_0 falls from \S+ to (\S+) \(N = 1 -> 512\)", _yona_at("repeat-colon", 512, "mean_sink0", ".3f"),
     "Sink_0 Repeat: N=512"),
    (r"and from (\S+) to \S+ in the instruction form\. Many", _yona_at("instruct", 1, "mean_sink0", ".3f"),
     "Sink_0 instruct N=1"),
    (r"and from \S+ to (\S+) in the instruction form\. Many", _yona_at("instruct", 512, "mean_sink0", ".3f"),
     "Sink_0 instruct N=512"),
    (rf"\(distance (\S+) -> \S+ in the {_C},", _yona_at("repeat-colon", 1, "distance_by_layer", ".2f", 0),
     "layer-0 distance Repeat: N=1"),
    (rf"\(distance \S+ -> (\S+) in the {_C},", _yona_at("repeat-colon", 512, "distance_by_layer", ".2f", 0),
     "layer-0 distance Repeat: N=512"),
    (rf"{_C}, (\S+) -> \S+ in the {_I}\)", _yona_at("instruct", 1, "distance_by_layer", ".2f", 0),
     "layer-0 distance instruct N=1"),
    (rf"{_C}, \S+ -> (\S+) in the {_I}\)", _yona_at("instruct", 512, "distance_by_layer", ".2f", 0),
     "layer-0 distance instruct N=512"),
    (r"\(layer 5: (\S+) -> \S+, its norm ratio", _yona_at("repeat-colon", 1, "distance_by_layer", ".2f", 5),
     "layer-5 distance Repeat: N=1"),
    (r"\(layer 5: \S+ -> (\S+), its norm ratio", _yona_at("repeat-colon", 512, "distance_by_layer", ".2f", 5),
     "layer-5 distance Repeat: N=512"),
    (r"its norm ratio (\S+) -> \S+: the last copy", _yona_at("repeat-colon", 1, "norm_ratio_by_layer", ".2f", 5),
     "layer-5 norm ratio Repeat: N=1"),
    (r"its norm ratio \S+ -> (\S+): the last copy", _yona_at("repeat-colon", 512, "norm_ratio_by_layer", ".2f", 5),
     "layer-5 norm ratio Repeat: N=512"),
    (r"at layer 11 the norm ratio is at most (\S+) and", _yona_extreme("norm_ratio_by_layer", slice(11, 12), max, ".3f"),
     "layer-11 norm ratio, largest"),
    (r"and the distance at least (\S+) in every cell", _yona_extreme("distance_by_layer", slice(11, 12), min, ".2f"),
     "layer-11 distance, smallest"),
    (r"no later layer comes closer than (\S+)\.", _yona_extreme("distance_by_layer", slice(11, None), min, ".2f"),
     "distance from layer 11 on, smallest"),
]
QUOTES += [Quote("docs/repetition.md", pattern, YONA_SINKRUN, fn, "yona sinkrun: " + what)
           for pattern, fn, what in YONA_QUOTES]


YONA_CLUSTER = "docs/results/repeat_yona/cluster_eval"
GRID = "docs/results/repeat_grid_h100"


def _yona_minutes(src: Path) -> str:
    """Minutes of a recorded run: the last ``elapsed H:MM:SS`` or ``M:SS`` of its progress lines (``stdout.txt``)."""
    last = re.findall(r"elapsed (\d+(?::\d+)+)", (src / "stdout.txt").read_text())[-1]
    seconds = 0
    for part in last.split(":"):
        seconds = 60 * seconds + int(part)
    return f"{seconds / 60:.0f}"


def _yona_rate(kind: str, variant: str, key: str = "diverged") -> Callable[[Path], str]:
    return lambda src: _csv_row(src / "rates.csv", kind=kind, variant=variant, n="512")[key]


def _yona_fire(kind: str) -> Callable[[Path], str]:
    return lambda src: f"{float(_yona_rate(kind, 'none', 'sink_fire')(src)):.2f}"


def _yona_best(key: str, fmt: str) -> Callable[[Path], str]:
    def get(src: Path) -> str:
        res = read_json(src / "cluster.json")
        return format(res["best_cluster"] if key == "id" else res["clusters"][0][key], fmt)
    return get


YONA_CLUSTER_QUOTES = [
    (r"192 answers in (\d+) minutes", _yona_minutes, "run time"),
    (r"The best cluster, number (\d+) of 64", _yona_best("id", "d"), "best cluster"),
    (r"of 64, holds (\d+) tokens, all punctuation", _yona_best("size", "d"), "best cluster's size"),
    (r"its sequences score (\S+) in the search", _yona_best("score", ".2f"), "best cluster's score"),
    (r"After the best cluster's 512 tokens (\d+) of 32 words diverge", _yona_rate("cluster", "none"), "cluster"),
    (r"512 random tokens \((\d+) of 32\)", _yona_rate("random", "none"), "random"),
    (r"against (\d+) of 32 after 528 copies of the word", _yona_rate("repeat", "none"), "repeat"),
    (r"than the copies do: (\S+) \(beyond", _yona_fire("cluster"), "cluster firing"),
    (r"ordinary range\) against (\S+)\. Exciting", _yona_fire("repeat"), "repeat firing"),
    (r"repetition \((\d+) of 32\) against the cluster", _yona_rate("repeat", "none"), "repeat (intervals)"),
    (r"against the cluster \((\d+) of 32\) is at the edge", _yona_rate("cluster", "none"), "cluster (intervals)"),
    (r"after repetition (\d+) -> \d+ of 32", _yona_rate("repeat", "none"), "repeat, patch: before"),
    (r"after repetition \d+ -> (\d+) of 32", _yona_rate("repeat", "ours"), "repeat, patch: after"),
    (r"after random tokens (\d+) -> \d+;", _yona_rate("random", "none"), "random, patch: before"),
    (r"after random tokens \d+ -> (\d+);", _yona_rate("random", "ours"), "random, patch: after"),
    (r"cluster's tokens (\d+) -> \d+\. The patch's gate", _yona_rate("cluster", "none"), "cluster, patch: before"),
    (r"cluster's tokens \d+ -> (\d+)\. The patch's gate", _yona_rate("cluster", "ours"), "cluster, patch: after"),
    (r"repetition gives (\d+) of 32 here", _yona_rate("repeat", "none"), "repeat (answer length)"),
]
QUOTES += [Quote("docs/repetition.md", pattern, YONA_CLUSTER, fn, "yona cluster: " + what)
           for pattern, fn, what in YONA_CLUSTER_QUOTES]
QUOTES += [
    Quote("docs/repetition.md", r"\(480 cells: 24 EVAL words x 2 forms x N = 1, 2, 4, \.\.\., 512; (\d+) minutes",
          YONA_SINKRUN, _yona_minutes, "yona sinkrun: run time"),
    Quote("docs/repetition.md", r"instruction form at N = 512 from (\S+) to \S+ with 128-token answers", GRID,
          _csv_value("summary.csv", "rate", _percent, variant="none", form="instruct", n="512"),
          "yona cluster: the grid's instruct N=512 unpatched"),
    Quote("docs/repetition.md", r"instruction form at N = 512 from \S+ to (\S+) with 128-token answers", GRID,
          _csv_value("summary.csv", "rate", _percent, variant="ours", form="instruct", n="512"),
          "yona cluster: the grid's instruct N=512 ours"),
    Quote("docs/repetition.md", r"against the grid's (\d+) of 62 at N = 512", GRID,
          lambda src: _csv_row(src / "summary.csv", variant="none", form="instruct", n="512")["diverged"],
          "yona cluster: the grid's instruct N=512 unpatched count"),
]


QUOTES += [
    Quote("README.md", r"no repeated copy becomes a sink \(at most (\d+)% of heads", YONA_SINKRUN,
          lambda src: f"{100 * float(_yona_max_cell_share(src)):.0f}", "README yona: largest share"),
    Quote("README.md", r"takes attention from token 0 \(Sink_0\s+(\S+ -> \S+) at N = 512", YONA_SINKRUN,
          lambda src: f"{_yona_at('repeat-colon', 1, 'mean_sink0', '.3f')(src)} -> "
                      f"{_yona_at('repeat-colon', 512, 'mean_sink0', '.3f')(src)}", "README yona: Sink_0"),
    Quote("README.md", r"our cluster attack diverges (\d+) of 32 words", YONA_CLUSTER, _yona_rate("cluster", "none"),
          "README yona: cluster"),
    Quote("README.md", r"as random tokens do, against (\d+) of 32 for repetition", YONA_CLUSTER,
          _yona_rate("repeat", "none"), "README yona: repeat"),
    Quote("README.md", r"patch: (\d+) of 32 after repetition", YONA_CLUSTER, _yona_rate("repeat", "ours"),
          "README yona: repeat, patched"),
    Quote("README.md", r"after repetition, (\d+) of 32 after the cluster\)", YONA_CLUSTER, _yona_rate("cluster", "ours"),
          "README yona: cluster, patched"),
]


YONA_PAPER = "docs/results/repeat_yona/sinkrun_paper"
QUOTES += [Quote("docs/repetition.md", pattern, YONA_PAPER, fn, "yona paper words: " + what) for pattern, fn, what in [
    (r"mean over the three: distance (\S+) at layer 0", _yona_at("repeat-colon", 2048, "distance_by_layer", ".2f", 0),
     "layer-0 distance at N=2048"),
    (r"at layer 0 and (\S+) at layer 5,", _yona_at("repeat-colon", 2048, "distance_by_layer", ".2f", 5),
     "layer-5 distance at N=2048"),
    (r"where the norm ratio reaches (\S+)\)", _yona_at("repeat-colon", 2048, "norm_ratio_by_layer", ".2f", 5),
     "layer-5 norm ratio at N=2048"),
    (r"at layer 11 the distance is at least (\S+) and", _yona_extreme("distance_by_layer", slice(11, 12), min, ".2f"),
     "layer-11 distance, smallest"),
    (r"and the norm ratio at most (\S+) in every cell\.", _yona_extreme("norm_ratio_by_layer", slice(11, 12), max, ".2f"),
     "layer-11 norm ratio, largest"),
]]


# --- gu ---
# Gu et al. in a text LM (issue 19 item 5): the gu-lm-* runs' rows and the Table 10 probes (docs/training.md).

GU_RUNS = ["gu-lm-nobos-long", "gu-lm-random0", "gu-lm-fixed8"]
RENDERERS["training-gu"] = training_renderer(GU_RUNS)
#: (run, probe) -> (what the model was trained on, what the evaluation rows are, kind, Gu et al.'s number)
GU_TABLE10 = {
    ("gu-lm-nobos-long", "text"): ("text, no BOS (default)", "held-out text", "default",
                                   "Sink_1 18.2% (first token)"),
    ("gu-lm-random0", "random0"): ("random token at 0", "random token at 0", "training-time (paper's)",
                                   "27% on the first token (kept)"),
    ("gu-lm-fixed8", "fixed"): ("fixed token at j", "fixed token at j", "training-time (paper's)",
                                "~70% on position j (moved)"),
    ("gu-lm-nobos-long", "random0"): ("text, no BOS (default)", "random token at 0", "evaluation-time (ours)", "-"),
    ("gu-lm-nobos-long", "fixed"): ("text, no BOS (default)", "fixed token at j", "evaluation-time (ours)", "-"),
}


def _gu_row(run: str, probe: str, entry: dict[str, Any], j: int) -> list[str]:
    trained, rows, kind, paper = GU_TABLE10[(run, probe)]
    p = entry[probe]
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    return [run, trained, str(entry["step"]), rows, kind, pct(p["sink"][0]), pct(p["sink"][j]),
            f"{p['alpha_max_head'][0]:.3f}", f"{p['alpha_max_head'][j]:.3f}", paper]


@renderer("gu-table10")
def render_gu_table10(source: Path) -> str:
    """Gu et al.'s Table 10 tests from ``SOURCE/positions.json`` (``sinkscope train positions``):
    every run at the last step all three reached (equal steps), then the default run at its own last step."""
    d = read_json(source / "positions.json")
    j = int(d["settings"]["fixed_pos"])
    runs = d["runs"]
    common = max(set.intersection(*({e["step"] for e in runs[r]} for r in GU_RUNS if r in runs)))
    at = {r: {e["step"]: e for e in runs[r]} for r in runs}
    rows = []
    for (run, probe) in GU_TABLE10:
        if run in at and probe != "text" and run == "gu-lm-nobos-long":
            continue
        if run in at:
            rows.append(_gu_row(run, probe, at[run][common], j))
    long = runs.get("gu-lm-nobos-long", [])
    if long and long[-1]["step"] != common:
        rows += [_gu_row("gu-lm-nobos-long", probe, long[-1], j) for probe in ("text", "random0", "fixed")]
    else:
        rows += [_gu_row("gu-lm-nobos-long", probe, at["gu-lm-nobos-long"][common], j) for probe in ("random0", "fixed")]
    header = ["run", "trained on", "step", "evaluated on", "test", "Sink_0 %", f"Sink_{j} %",
              "strongest head alpha_0", f"strongest head alpha_{j}", "Gu et al. (Table 10, 60M, 20k steps)"]
    return md_table(header, rows)



#: uniform causal attention's alpha_k over T = 64 (every query spreading evenly over what it sees): the level a
#: head with no preference for key k gives it, (H_64 - H_k) / (64 - k)
def _uniform_alpha(k: int, T: int = 64) -> float:
    return sum(1 / (t + 1) for t in range(k, T)) / (T - k)


#: the verdicts beside the paper's numbers; the numbers in "ours" are read from the results
GU_VERDICTS = {
    "emerges": ("**not reproduced**: no head puts more than uniform attention on the first token at any step; about 1% "
                "of the tokens at which their sink appears, 1/140 of their parameters"),
    "random0": "**cannot be tested without a sink**: the default has none to keep; with the random byte, Sink_0 stays 0",
    "fixed": ("**partly reproduced**: the sink goes where the fixed token is (and nowhere else; plain text gives none "
              "at any position), at a fraction of the paper's ~70%"),
    "probes": "nothing to keep or move: the default model gives both changed positions about uniform attention",
}


@renderer("gu-verdicts")
def render_gu_verdicts(source: Path) -> str:
    """The verdict table of docs/training.md's Gu et al. section: the paper's number, ours (from
    ``SOURCE/gu-positions/positions.json`` and ``SOURCE/gu-lm-nobos-long/final.json``), the verdict."""
    d = read_json(source / "gu-positions" / "positions.json")
    j = int(d["settings"]["fixed_pos"])
    runs = d["runs"]
    common = max(set.intersection(*({e["step"] for e in runs[r]} for r in GU_RUNS)))
    at = {r: {e["step"]: e for e in runs[r]} for r in GU_RUNS}
    final = read_json(source / "gu-lm-nobos-long" / "final.json")
    long = runs["gu-lm-nobos-long"][-1]
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    r0, f8, t = at["gu-lm-random0"][common]["random0"], at["gu-lm-fixed8"][common]["fixed"], long["text"]
    ours_default = (f"Sink_0 {pct(t['sink'][0])} at step {long['step']} ({final['tokens'] / 1e6:.1f}M byte tokens, "
                    f"{final['wall_time_s'] / 60:.0f} min on one core); strongest head's alpha_0 "
                    f"{t['alpha_max_head'][0]:.3f} (uniform attention: {_uniform_alpha(0):.3f})")
    d0 = at["gu-lm-nobos-long"][common]["text"]
    ours_r0 = (f"at step {common}: Sink_0 {pct(r0['sink'][0])}, strongest head's alpha_0 {r0['alpha_max_head'][0]:.3f} "
               f"(default at the same step: {pct(d0['sink'][0])}, {d0['alpha_max_head'][0]:.3f})")
    ours_f8 = (f"at step {common}: Sink_{j} {pct(f8['sink'][j])}, Sink_0 {pct(f8['sink'][0])}; strongest head's "
               f"alpha_{j} {f8['alpha_max_head'][j]:.3f} (uniform: {_uniform_alpha(j):.3f}; default at the same step: "
               f"{d0['alpha_max_head'][j]:.3f})")
    pr, pf = long["random0"], long["fixed"]
    ours_probes = (f"default model at step {long['step']}: random byte at 0: Sink_0 {pct(pr['sink'][0])}, alpha_0 "
                   f"{pr['alpha_max_head'][0]:.3f}; NUL at {j}: Sink_{j} {pct(pf['sink'][j])}, alpha_{j} "
                   f"{pf['alpha_max_head'][j]:.3f} (plain text: {t['alpha_max_head'][j]:.3f})")
    rows = [
        ["a sink forms without BOS (default)", "Sink_1 18.2%, from 1-2k steps (1-2B tokens)", ours_default,
         GU_VERDICTS["emerges"]],
        ["random token at 0 keeps the sink (training-time)", "27%", ours_r0, GU_VERDICTS["random0"]],
        ["fixed token at j moves the sink to j (training-time)", "~70% at j", ours_f8, GU_VERDICTS["fixed"]],
        ["the same changes at evaluation time only (ours)", "not in the paper", ours_probes, GU_VERDICTS["probes"]],
    ]
    return md_table(["test", "Gu et al. (60M, 20k steps of ~1M tokens)", "ours (4 layers, width 96, bytes)",
                     "verdict"], rows)



def _gu_final(fmt: Callable[[dict[str, Any]], str]) -> Callable[[Path], str]:
    return lambda source: fmt(read_json(source / "final.json"))


QUOTES.extend([
    Quote(TRAINING_DOC, r"tokens \((\d+)M here, their sink", f"{TRAINING_RESULTS}/gu-lm-nobos-long",
          _gu_final(lambda f: f"{f['tokens'] / 1e6:.0f}"), "gu: the long run's tokens"),
    Quote(TRAINING_DOC, r"model size \((\S+)M parameters vs 60M", f"{TRAINING_RESULTS}/gu-lm-nobos-long",
          _gu_final(lambda f: f"{f['params'] / 1e6:.2f}"), "gu: the model's parameters"),
])


GU_POSITIONS = f"{TRAINING_RESULTS}/gu-positions"


def _gu_entry(run: str, step: str) -> Callable[[Path], dict[str, Any]]:
    """One run's probe entry of ``positions.json``: at its ``last`` step, or at the last step all runs reached."""
    def get(src: Path) -> dict[str, Any]:
        runs = read_json(src / "positions.json")["runs"]
        if step == "last":
            return runs[run][-1]
        common = max(set.intersection(*({e["step"] for e in runs[r]} for r in GU_RUNS if r in runs)))
        return next(e for e in runs[run] if e["step"] == common)
    return get


QUOTES += [
    Quote("README.md", r"a 55-minute run \((\d+) steps, \S+M byte tokens\)", f"{TRAINING_RESULTS}/gu-lm-nobos-long",
          _gu_final(lambda f: str(f["step"])), "README gu: steps"),
    Quote("README.md", r"a 55-minute run \(\d+ steps, (\S+)M byte tokens\)", f"{TRAINING_RESULTS}/gu-lm-nobos-long",
          _gu_final(lambda f: f"{f['tokens'] / 1e6:.1f}"), "README gu: tokens"),
    Quote("README.md", r"forms no sink either: Sink_0 (\S+)%", GU_POSITIONS,
          lambda src: f"{100 * _gu_entry('gu-lm-nobos-long', 'last')(src)['text']['sink'][0]:.1f}", "README gu: Sink_0"),
    Quote("README.md", r"attention on the first token (\S+), the uniform level", GU_POSITIONS,
          lambda src: f"{_gu_entry('gu-lm-nobos-long', 'last')(src)['text']['alpha_max_head'][0]:.3f}",
          "README gu: strongest head's alpha_0"),
    Quote("README.md", r"becomes a sink \(Sink_8 (\S+)% at 10k steps", GU_POSITIONS,
          lambda src: f"{100 * _gu_entry('gu-lm-fixed8', 'common')(src)['fixed']['sink'][8]:.1f}", "README gu: Sink_8"),
]


# --- guo ---
# Issue 19 item 5 (Guo et al.): the mutual-reinforcement fit (`sinkscope train reinforcement`) and ReLU attention
# at lr 3e-4; quotes of the re-run bb-peak-*, bb-noslot-*, bb-signorm-* and lm-* runs' prose numbers.

GUO_REINFORCEMENT = "docs/results/guo/reinforcement-bb-peak-adam"


@renderer("guo-reinforcement")
def render_guo_reinforcement(source: Path) -> str:
    """The log-step fit of the sink head's logit gap and BOS's value drain (``SOURCE/reinforcement.json``)."""
    d = read_json(source / "reinforcement.json")
    f, fa = d["fit"], d["fit_all"]
    steps, val = d["steps"], d["value_out_norm"]
    onset = d["onset_step"]
    return md_table(
        ["run", "head", "dormant from step", "fit steps", "slope per e-fold of steps (per decade)", "R^2 ln(step)",
         "R^2 straight line in step", "BOS value out / median: step 0, fit start, end"],
        [[d["run"], f"L{d['layer']}H{d['head']}", str(onset), f"{f['first_step']}-{f['last_step']}",
          f"{f['slope']:.2f} ({f['slope_per_decade']:.1f})", f"{f['r2']:.2f}", f"{d['linear_r2']:.2f}",
          f"{val[0]:.2f} / {val[steps.index(f['first_step'])]:.2f} / {val[-1]:.2f}"],
         [d["run"], f"L{d['layer']}H{d['head']}", str(onset), f"{fa['first_step']}-{fa['last_step']}",
          f"{fa['slope']:.2f} ({fa['slope_per_decade']:.1f})", f"{fa['r2']:.2f}", f"{d['linear_r2_all']:.2f}",
          f"{val[0]:.2f} / {val[steps.index(fa['first_step'])]:.2f} / {val[-1]:.2f}"]])


@renderer("guo-gap-series")
def render_guo_gap_series(source: Path) -> str:
    """The sink head's gap, log-sum-exp gap, attention on BOS and value ratio at a few steps."""
    d = read_json(source / "reinforcement.json")
    rows = []
    for step in (0, 250, 500, 1000, 1500, 2000, 4000, 6000, 8000):
        if step in d["steps"]:
            i = d["steps"].index(step)
            rows.append([str(step), f"{d['gap'][i] + 0.0:.1f}".replace("-0.0", "0.0"), f"{d['gap_lse'][i]:.1f}", f"{d['bos_attention'][i]:.2f}",
                         f"{d['value_out_norm'][i]:.2f}"])
    return md_table(["step", "logit gap (mean)", "logit gap (log-sum-exp)", "attention on BOS",
                     "BOS value out / median"], rows)


GUO_DIAG = "docs/results/guo/diagnose-peak"


def _parts(src: Path, run: str, part: str, fmt: str = ".1f") -> tuple[str, str]:
    """``diagnose parts`` of ``run``: what ``part`` adds at the first position and at the median other one."""
    for line in (src / "parts.jsonl").read_text().splitlines():
        d = json.loads(line)
        if d["run"].endswith("/" + run):
            p = d["parts"][part]
            return format(p["first"], fmt), format(p["median_other"], fmt)
    raise KeyError(run)


@renderer("guo-noslot-targets")
def render_guo_noslot_targets(source: Path) -> str:
    """``diagnose targets --layer 1`` of the no-BOS runs (``SOURCE/targets.jsonl``): where the non-trigger queries
    of layer 1 put their attention."""
    by_run = {json.loads(x)["run"].split("/")[-1]: json.loads(x) for x in (source / "targets.jsonl").read_text().splitlines()}
    rows = []
    for run in ("bb-noslot-softmax", "bb-noslot-kbias", "bb-noslot-softmax1", "bb-noslot-sinktoken",
                "bb-noslot-sinktoken-long"):
        if run in by_run:
            c = by_run[run]["classes"]["non_trigger"]
            rows.append([run, f"{c['slot']:.2f}", f"{c['first']:.4f}", f"{c['self']:.2f}", f"{c['previous']:.2f}",
                         f"{c['rest']:.2f}"])
    return md_table(["run (layer 1, non-trigger queries)", "slot", "first token", "self", "previous", "rest"], rows)


GUO_NOSLOT = "docs/results/guo/diagnose-noslot"


def _target(src: Path, run: str, key: str, fmt: str) -> str:
    """``diagnose targets`` of ``run``: the non-trigger queries' share on ``key`` (slot, first, self, ...)."""
    for line in (src / "targets.jsonl").read_text().splitlines():
        d = json.loads(line)
        if d["run"].endswith("/" + run):
            return format(d["classes"]["non_trigger"][key], fmt)
    raise KeyError(run)


@renderer("guo-signorm-scores")
def render_guo_signorm_scores(source: Path) -> str:
    """``diagnose scores --layer 1`` of the normalised-sigmoid runs (``SOURCE/scores.jsonl``), non-trigger
    queries by position bucket."""
    by_run = {json.loads(x)["run"].split("/")[-1]: json.loads(x) for x in (source / "scores.jsonl").read_text().splitlines()}
    rows = []
    for run in ("bb-signorm-len64", "bb-signorm-len32"):
        for b in by_run[run]["classes"]["non_trigger"]:
            rows.append([run, b["positions"], f"{b['logit_first']:.2f}", f"{b['logit_others']:.2f}",
                         f"{b['score_first']:.2f}", f"{b['score_others_sum']:.2f}", f"{b['share_first']:.2f}"])
    return md_table(["run", "positions", "logit on BOS", "mean logit on the others", "s_0", "S", "BOS share"], rows)


def _series1000(src: Path, run: str) -> str:
    """Layer 1's non-trigger attention on BOS (``head_bos_mass``) every 1000 steps of a committed run."""
    rows = [json.loads(x) for x in (src / run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return ", ".join(f"{r['head_bos_mass']['L1H0']['non_trigger']:.2f}" for r in rows if r["step"] % 1000 == 0)


RENDERERS["guo-relu-lr"] = training_renderer(["bb-peak-adam-lr3e-4", "bb-peak-relu-lr3e-4", "bb-peak-relu"])


def _abs0(run: str, step: int | None = None, key: str = "bos_residual_abs", fmt: str = ".1f") -> Callable[[Path], str]:
    """Layer 0's value of ``key`` (final row, or the row at ``step``) of a committed training run."""
    def get(src: Path) -> str:
        row = read_json(src / run / "final.json") if step is None else _row(run, step)(src)
        return format(row[key][0], fmt)
    return get


QUOTES += [
    # section 1 prose and summary table, re-run bb-peak-adam / bb-peak-sgd
    Quote(TRAINING_DOC, r"\| 11\.5 -> (\S+) in 8k steps \(3\.9x", TRAINING_RESULTS, _abs0("bb-peak-adam"),
          "bb-peak-adam final BOS residual (summary table)"),
    Quote(TRAINING_DOC, r"BOS / median 0\.97 -> (\S+); re-run\)", TRAINING_RESULTS,
          _abs0("bb-peak-adam", key="bos_residual_norm", fmt=".2f"), "bb-peak-adam final ratio (summary table)"),
    Quote(TRAINING_DOC, r"grows from 11\.5 to (\S+) over 8k steps", TRAINING_RESULTS, _abs0("bb-peak-adam"),
          "bb-peak-adam final BOS residual"),
    Quote(TRAINING_DOC, r"roughly linearly \((\d+ at 2k, \d+ at 4k, \d+ at 6k, \d+ at 8k)\)", TRAINING_RESULTS,
          lambda src: ", ".join(f"{_row('bb-peak-adam', n)(src)['bos_residual_abs'][0]:.0f} at {n // 1000}k"
                                for n in (2000, 4000, 6000, 8000)), "bb-peak-adam residual by step"),
    Quote(TRAINING_DOC, r"so the ratio goes 0\.97 -> (\S+ \(2k\) -> \S+ \(6k\) -> \S+) \(8k\)", TRAINING_RESULTS,
          lambda src: " -> ".join(f"{_row('bb-peak-adam', n)(src)['bos_residual_norm'][0]:.2f}" + s
                                  for n, s in ((2000, " (2k)"), (6000, " (6k)"), (8000, ""))),
          "bb-peak-adam ratio by step"),
    Quote(TRAINING_DOC, r"reaches (\S+) by step 500 and then stays", TRAINING_RESULTS, _abs0("bb-peak-sgd", 500),
          "bb-peak-sgd residual at step 500"),
    Quote(TRAINING_DOC, r"stays \((\S+) at 2k, \S+ at 8k; Guo", TRAINING_RESULTS, _abs0("bb-peak-sgd", 2000),
          "bb-peak-sgd residual at step 2000"),
    Quote(TRAINING_DOC, r"stays \(\S+ at 2k, (\S+) at 8k; Guo", TRAINING_RESULTS, _abs0("bb-peak-sgd"),
          "bb-peak-sgd final residual"),
    Quote(TRAINING_DOC, r"differ \(Adam (\S+), SGD \S+\)", TRAINING_RESULTS, _abs0("bb-peak-adam", 2000),
          "bb-peak-adam residual at equal loss"),
    Quote(TRAINING_DOC, r"do not \((\S+) vs 2\.04\)", TRAINING_RESULTS,
          _abs0("bb-peak-adam", 2000, "bos_residual_norm", ".2f"), "bb-peak-adam ratio at equal loss"),
    Quote(TRAINING_DOC, r"converged \((\S+) at 8k, excess loss", TRAINING_RESULTS,
          _abs0("bb-peak-adam", key="bos_residual_norm", fmt=".2f"), "bb-peak-adam final ratio"),
    # the Guo et al. section
    Quote(TRAINING_DOC, r"the gap grows by (\S+) nats of logit per e-fold of steps from", GUO_REINFORCEMENT,
          lambda src: format(read_json(src / "reinforcement.json")["fit_all"]["slope"], ".2f"), "gap slope, all steps"),
    Quote(TRAINING_DOC, r"from step 250 on \(R\^2 (\S+);", GUO_REINFORCEMENT,
          lambda src: format(read_json(src / "reinforcement.json")["fit_all"]["r2"], ".2f"), "gap R^2, all steps"),
    Quote(TRAINING_DOC, r"a straight line in the step gives (\S+)\)", GUO_REINFORCEMENT,
          lambda src: format(read_json(src / "reinforcement.json")["linear_r2_all"], ".2f"), "linear R^2, all steps"),
    Quote(TRAINING_DOC, r"once the head is dormant \(step (\d+) on\)", GUO_REINFORCEMENT,
          lambda src: str(read_json(src / "reinforcement.json")["onset_step"]), "dormant onset"),
    Quote(TRAINING_DOC, r"the slope is (\S+) with R\^2 \S+ \(a straight line", GUO_REINFORCEMENT,
          lambda src: format(read_json(src / "reinforcement.json")["fit"]["slope"], ".2f"), "gap slope from onset"),
    Quote(TRAINING_DOC, r"the slope is \S+ with R\^2 (\S+) \(a straight line", GUO_REINFORCEMENT,
          lambda src: format(read_json(src / "reinforcement.json")["fit"]["r2"], ".2f"), "gap R^2 from onset"),
    Quote(TRAINING_DOC, r"R\^2 \S+ \(a straight line: (\S+)\)", GUO_REINFORCEMENT,
          lambda src: format(read_json(src / "reinforcement.json")["linear_r2"], ".2f"), "linear R^2 from onset"),
    # ReLU attention at lr 3e-4
    Quote(TRAINING_DOC, r"flat ~24 \((\S+ at 500, \S+ at 1000, \S+ at 1500)\)", TRAINING_RESULTS,
          lambda src: ", ".join(f"{_row('bb-peak-relu-lr3e-4', n)(src)['bos_residual_abs'][0]:.1f} at {n}"
                                for n in (500, 1000, 1500)), "relu lr 3e-4 residual while the copy is learned"),
    Quote(TRAINING_DOC, r"copy loss (\S+ at step 500, \S+ at 1500)\)", TRAINING_RESULTS,
          lambda src: f"{_row('bb-peak-relu-lr3e-4', 500)(src)['loss_copy']:.2f} at step 500, "
                      f"{_row('bb-peak-relu-lr3e-4', 1500)(src)['loss_copy']:.2f} at 1500",
          "relu lr 3e-4 copy loss"),
    Quote(TRAINING_DOC, r"about linearly: (\S+ at 2k, \S+ at 4k, \S+ at 6k, \S+ at 8k),", TRAINING_RESULTS,
          lambda src: ", ".join(f"{_row('bb-peak-relu-lr3e-4', n)(src)['bos_residual_abs'][0]:.1f} at {n // 1000}k"
                                for n in (2000, 4000, 6000, 8000)), "relu lr 3e-4 residual by step"),
    Quote(TRAINING_DOC, r"8k, (\S+)x the median token \((\S+)\), against 2200", TRAINING_RESULTS,
          lambda src: (f"{_abs0('bb-peak-relu-lr3e-4', key='bos_residual_norm', fmt='.1f')(src)}",
                       f"{_abs0('bb-peak-relu-lr3e-4', key='median_residual_abs', fmt='.1f')(src)}"),
          "relu lr 3e-4 final ratio and median"),
    Quote(TRAINING_DOC, r"then (\S+) at 8k \((\S+)x the median; 2200", TRAINING_RESULTS,
          lambda src: (_abs0("bb-peak-relu-lr3e-4")(src),
                       _abs0("bb-peak-relu-lr3e-4", key="bos_residual_norm", fmt=".1f")(src)),
          "relu lr 3e-4 verdict row"),
    Quote(TRAINING_DOC, r"\(eval loss (\S+), copy loss \S+\) and no head sinks", TRAINING_RESULTS,
          _final("bb-peak-relu-lr3e-4", "loss", ".3f"), "relu lr 3e-4 eval loss"),
    Quote(TRAINING_DOC, r"copy loss (\S+)\) and no head sinks", TRAINING_RESULTS,
          _final("bb-peak-relu-lr3e-4", "loss_copy", ".3f"), "relu lr 3e-4 copy loss"),
    Quote(TRAINING_DOC, r"raw attention on BOS <= (\S+) in every layer, Sink_0", TRAINING_RESULTS,
          lambda src: format(max(max(a) for a in read_json(src / "bb-peak-relu-lr3e-4" / "final.json")["bos_attention"]),
                             ".2f"), "relu lr 3e-4 max raw attention on BOS"),
    Quote(TRAINING_DOC, r"share on BOS is (\S+) at a raw weight of (\S+):", TRAINING_RESULTS,
          lambda src: (format(read_json(src / "bb-peak-relu-lr3e-4" / "final.json")["bos_attention_proxy"][2][0], ".2f"),
                       format(read_json(src / "bb-peak-relu-lr3e-4" / "final.json")["bos_attention"][2][0], ".2f")),
          "relu lr 3e-4 layer-2 proxy vs raw"),
    # diagnose parts of the re-run peak runs
    Quote(TRAINING_DOC, r"layer 0's MLP adds (\S+) at BOS against (\S+) at the median token \(the massive", GUO_DIAG,
          lambda src: _parts(src, "bb-peak-adam", "mlp"), "bb-peak-adam layer-0 MLP part"),
    Quote(TRAINING_DOC, r"layer 0's attention adds (\S+) against (\S+) \(BOS, the first", GUO_DIAG,
          lambda src: _parts(src, "bb-peak-adam", "attention"), "bb-peak-adam layer-0 attention part"),
    Quote(TRAINING_DOC, r"layer 0's MLP adding only (\S+) at BOS \((\S+) at the median", GUO_DIAG,
          lambda src: _parts(src, "bb-peak-sgd", "mlp"), "bb-peak-sgd layer-0 MLP part"),
    Quote(TRAINING_DOC, r"then grows to (\S+) \((\S+)x\) by 8k \(section", TRAINING_RESULTS,
          lambda src: (_abs0("bb-peak-relu-lr3e-4", fmt=".0f")(src),
                       _abs0("bb-peak-relu-lr3e-4", key="bos_residual_norm", fmt=".0f")(src)),
          "relu lr 3e-4 summary-table row"),
    Quote(TRAINING_DOC, r"ratio after layer 0 is (\S+) \(absolute (\S+)\) against 15\.2", TRAINING_RESULTS,
          lambda src: (_abs0("bb-peak-relu-flat", key="bos_residual_norm", fmt=".2f")(src),
                       _abs0("bb-peak-relu-flat")(src)), "relu-flat control ratio"),
    Quote(TRAINING_DOC, r"layer-2 head gives BOS (\S+) of the row-normalised proxy, Sink_0 proxy (\S+), but", TRAINING_RESULTS,
          lambda src: (format(read_json(src / "bb-peak-relu-flat" / "final.json")["bos_attention_proxy"][2][0], ".2f"),
                       _final("bb-peak-relu-flat", "sink_ratio_proxy", ".2f")(src)), "relu-flat layer-2 proxy"),
    Quote(TRAINING_DOC, r"first character\): ratio (\S+) \((\S+)\), attention output", TRAINING_RESULTS,
          lambda src: (_abs0("bb-peak-relu-nobos", key="bos_residual_norm", fmt=".2f")(src),
                       _abs0("bb-peak-relu-nobos")(src)), "relu-nobos control ratio"),
    Quote(TRAINING_DOC, r"attention output at position 0 (\S+) vs (\S+) at the median token \(re-run", GUO_DIAG,
          lambda src: _parts(src, "bb-peak-relu-nobos", "attention", ".2f"),
          "relu-nobos attention part"),
    Quote(TRAINING_DOC, r"0's attention output at BOS (\S+) against (\S+) at the median token, its MLP", GUO_DIAG,
          lambda src: _parts(src, "bb-peak-relu-lr3e-4", "attention"), "relu lr 3e-4 attention part"),
    # section 2 (no BOS), from the re-run diagnose targets
    Quote(TRAINING_DOC, r"on the slot: (\S+) \(key bias\) and (\S+) \(softmax \+ 1's", GUO_NOSLOT,
          lambda src: (_target(src, "bb-noslot-kbias", "slot", ".2f"), _target(src, "bb-noslot-softmax1", "slot", ".2f")),
          "no-BOS slot shares"),
    Quote(TRAINING_DOC, r"attention, (\S+) / (\S+) on the first token; Sink_slot", GUO_NOSLOT,
          lambda src: (_target(src, "bb-noslot-kbias", "first", ".4f"),
                       _target(src, "bb-noslot-softmax1", "first", ".4f")), "no-BOS first-token shares"),
    Quote(TRAINING_DOC, r"spread instead \((\S+) on themselves, (\S+) over the rest\)", GUO_NOSLOT,
          lambda src: (_target(src, "bb-noslot-softmax", "self", ".2f"), _target(src, "bb-noslot-softmax", "rest", ".2f")),
          "no-BOS softmax spread"),
    Quote(TRAINING_DOC, r"queries give it (\S+) \(Gu et al\.: Sink_\* 74%", GUO_NOSLOT,
          lambda src: _target(src, "bb-noslot-sinktoken", "slot", ".2f"), "sink token's share at 3k"),
    Quote(TRAINING_DOC, r"Sink_slot (\S+), Sink_0 (\S+) and its proxy (\S+) \(Gu et al\.", TRAINING_RESULTS,
          lambda src: (_final("bb-noslot-kbias", "sink_ratio_slot", ".2f")(src), _final("bb-noslot-kbias", "sink_ratio", ".2f")(src),
                       _final("bb-noslot-kbias", "sink_ratio_proxy", ".2f")(src)), "no-BOS key-bias Sink_slot"),
    # section 3 (normalised sigmoid), re-run
    Quote(TRAINING_DOC, r"\(0 \.\. 6000; re-run\): length 64: (\S+(?:, \S+){6}); length 32: (\S+(?:, \S+){6}) \(the",
          TRAINING_RESULTS, lambda src: (_series1000(src, "bb-signorm-len64"), _series1000(src, "bb-signorm-len32")),
          "normalised sigmoid layer-1 BOS attention series"),
    Quote(TRAINING_DOC, r"a sink head \((\S+) on BOS, Sink_0 (\S+), BOS's value drained to (\S+)x\)", TRAINING_RESULTS,
          lambda src: (format(read_json(src / "bb-signorm-len32" / "final.json")["head_bos_mass"]["L1H0"]["non_trigger"], ".2f"),
                       _final("bb-signorm-len32", "sink_ratio", ".2f")(src),
                       _final("bb-signorm-len32", "bos_value_norm", ".2f", 1)(src)), "signorm len32 sink"),
    Quote(TRAINING_DOC, r"BOS's value has drained \((\S+)x the median\)", TRAINING_RESULTS,
          _final("bb-signorm-len64", "bos_value_norm", ".2f", 1), "signorm len64 value"),
    Quote(TRAINING_DOC, r"\(excess (\S+) at length 64, (\S+) at 32\)", TRAINING_RESULTS,
          lambda src: (_final("bb-signorm-len64", "excess_loss", ".3f")(src),
                       _final("bb-signorm-len32", "excess_loss", ".3f")(src)), "signorm excess losses"),
    Quote(TRAINING_DOC, r"the sink token gets (\S+) of the non-trigger attention at step 12000", GUO_NOSLOT,
          lambda src: _target(src, "bb-noslot-sinktoken-long", "slot", ".2f"), "sink token's share at 12k"),
    Quote(TRAINING_DOC, r"as in plain softmax \((\S+) over the rest\)", GUO_NOSLOT,
          lambda src: _target(src, "bb-noslot-sinktoken-long", "rest", ".2f"), "sink token long: rest"),
    Quote(TRAINING_DOC, r"the sink token gets (\S+) at 3k steps and (\S+) at 12k \(re-run", GUO_NOSLOT,
          lambda src: (_target(src, "bb-noslot-sinktoken", "slot", ".2f"),
                       _target(src, "bb-noslot-sinktoken-long", "slot", ".2f")), "sink token shares (summary table)"),
    # the first text runs (re-run: identical rows)
    Quote(TRAINING_DOC, r"trains worst at equal steps \((\S+) vs (\S+) for softmax;", TRAINING_RESULTS,
          lambda src: (_final("lm-sigmoid", "loss", ".3f")(src), _final("lm-softmax", "loss", ".3f")(src)),
          "lm-sigmoid vs lm-softmax loss"),
    Quote(TRAINING_DOC, r"its Sink_0 from the weights as used \((\S+)\) is the same", TRAINING_RESULTS,
          _final("lm-sigmoid", "sink_ratio", ".2f"), "lm-sigmoid Sink_0"),
    Quote(TRAINING_DOC, r"Normalised sigmoid: (\S+), no sink", TRAINING_RESULTS, _final("lm-sigmoid-norm", "loss", ".3f"),
          "lm-sigmoid-norm loss"),
    Quote(TRAINING_DOC, r"the loss is the best of the\s+four \((\S+)\)", TRAINING_RESULTS, _final("lm-kbias", "loss", ".3f"),
          "lm-kbias loss"),
    # softmax at lr 3e-4
    Quote(TRAINING_DOC, r"At lr 3e-4 \(`bb-peak-adam-lr3e-4`\) the gap grows by (\S+) per e-fold of steps from step 250 on with R\^2 (\S+) \(a line in the step: (\S+)\)",
          GUO_REINFORCEMENT + "-lr3e-4", lambda src: (
              format(read_json(src / "reinforcement.json")["fit_all"]["slope"], ".2f"),
              format(read_json(src / "reinforcement.json")["fit_all"]["r2"], ".2f"),
              format(read_json(src / "reinforcement.json")["linear_r2_all"], ".2f")), "lr 3e-4 gap fit, all steps"),
    Quote(TRAINING_DOC, r"dormant only from step (\d+), after which the slope is (\S+), R\^2 (\S+) \(line: (\S+)\)",
          GUO_REINFORCEMENT + "-lr3e-4", lambda src: (
              str(read_json(src / "reinforcement.json")["onset_step"]),
              format(read_json(src / "reinforcement.json")["fit"]["slope"], ".2f"),
              format(read_json(src / "reinforcement.json")["fit"]["r2"], ".2f"),
              format(read_json(src / "reinforcement.json")["linear_r2"], ".2f")), "lr 3e-4 gap fit from onset"),
    Quote(TRAINING_DOC, r"softmax's own residual after layer 0 reaches only (\S+) \((\S+)x the median\)", TRAINING_RESULTS,
          lambda src: (_abs0("bb-peak-adam-lr3e-4")(src), _abs0("bb-peak-adam-lr3e-4", key="bos_residual_norm", fmt=".2f")(src)),
          "adam lr 3e-4 residual"),
    # the verdict table
    Quote(TRAINING_DOC, r"\| 11\.5 -> (\S+) over 8k \(3\.9x\)", TRAINING_RESULTS, _abs0("bb-peak-adam"),
          "verdict table adam"),
    Quote(TRAINING_DOC, r"\| 11\.5 -> (\S+) \| reproduced \|", TRAINING_RESULTS, _abs0("bb-peak-sgd"),
          "verdict table sgd"),
    Quote(TRAINING_DOC, r"value out (\S+ -> \S+)x \|", GUO_REINFORCEMENT,
          lambda src: "{:.2f} -> {:.2f}".format(read_json(src / "reinforcement.json")["value_out_norm"][0],
                                                 read_json(src / "reinforcement.json")["value_out_norm"][-1]),
          "verdict table value drain"),
]


# --- lead: README's training-bullet sentences from the Guo et al. work ---
GUO_LR3 = "docs/results/guo/reinforcement-bb-peak-adam-lr3e-4"


def _r2(*path: str) -> Callable[[Path], str]:
    """An R^2 of ``SOURCE/reinforcement.json`` at ``path`` (``"fit_all", "r2"``: the ln(step) fit over every step;
    ``"linear_r2_all"``: the straight line's), to two decimals."""
    def get(src: Path) -> str:
        value: Any = read_json(src / "reinforcement.json")
        for key in path:
            value = value[key]
        return format(value, ".2f")
    return get


QUOTES += [
    Quote("README.md", r"then reaches (\d+)x the median by 8k steps, while softmax", TRAINING_RESULTS,
          lambda src: f"{read_json(src / 'bb-peak-relu-lr3e-4' / 'final.json')['bos_residual_norm'][0]:.0f}",
          "README guo: ReLU lr 3e-4 residual ratio"),
    Quote("README.md", r"while softmax's reaches (\d+)x\.", TRAINING_RESULTS,
          lambda src: f"{read_json(src / 'bb-peak-adam-lr3e-4' / 'final.json')['bos_residual_norm'][0]:.0f}",
          "README guo: softmax lr 3e-4 residual ratio"),
    Quote("README.md", r"\(R\^2 (\S+) at lr\s+3e-4,", GUO_LR3, _r2("fit_all", "r2"), "README guo: R^2 lr 3e-4"),
    Quote("README.md", r"3e-4, (\S+) at 1e-3, against", GUO_REINFORCEMENT, _r2("fit_all", "r2"), "README guo: R^2 lr 1e-3"),
    Quote("README.md", r"against (\S+) / \S+ for a straight line", GUO_LR3, _r2("linear_r2_all"),
          "README guo: straight-line R^2 lr 3e-4"),
    Quote("README.md", r"against \S+ / (\S+) for a straight line", GUO_REINFORCEMENT, _r2("linear_r2_all"),
          "README guo: straight-line R^2 lr 1e-3"),
    Quote("README.md", r"value through the head falls to\s+(\S+)x the median", "docs/results/guo",
          lambda src: "{:.2f}-{:.2f}".format(*sorted(
              read_json(src / d / "reinforcement.json")["value_out_norm"][-1]
              for d in ("reinforcement-bb-peak-adam", "reinforcement-bb-peak-adam-lr3e-4"))),
          "README guo: value drain range"),
]


if __name__ == "__main__":
    sys.exit(main())
