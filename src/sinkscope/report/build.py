"""Run the report's sections (each isolated: a failure is recorded, the others still run) and write
``index.html`` (self-contained), ``report.json`` and the CSV tables into one directory."""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torch import nn

from sinkscope.comma_lists import split_items
from sinkscope.errors import InputError
from sinkscope.io import ensure_output_dir, write_atomic, write_csv_atomic, write_json_atomic
from sinkscope.progress import ProgressCallback
from sinkscope.report.html import Section, render_page
from sinkscope.report.sections import SECTION_ORDER, SECTIONS, ReportContext, ReportOptions


@dataclass
class ReportResult:
    """What `build_report` wrote."""

    out_dir: Path
    index: Path
    sections: list[Section]
    total_s: float

    @property
    def failed(self) -> list[str]:
        return [s.key for s in self.sections if s.error is not None]


def parse_sections(spec: str | Sequence[str] | None) -> list[str]:
    """Section keys from ``"sinks,dormant"`` (or a list), in display order; None or ``all`` means all.

    Raises:
        InputError: an unknown section name (with a "did you mean"), or none named (an empty string is not "all").
    """
    if spec is None:
        return list(SECTION_ORDER)
    names = list(split_items(spec if isinstance(spec, str) else ",".join(str(s) for s in spec)))
    if not names:
        raise InputError(f"sections: name at least one of {', '.join(SECTION_ORDER)} (or all)", param="sections")
    if names == ["all"]:
        return list(SECTION_ORDER)
    for n in names:
        try:
            SECTIONS[n]
        except KeyError as e:
            raise InputError(str(e.args[0]).replace("report section", "section")) from None
    return [k for k in SECTION_ORDER if k in names]


def run_sections(ctx: ReportContext, keys: Sequence[str], progress: ProgressCallback | None = None) -> list[Section]:
    """Run the sections in order; an exception inside one becomes its ``error`` (KeyboardInterrupt propagates).
    ``progress(done, total, key)`` counts each section's own steps. The model card, when present, gets a table of
    every section's wall time at the end."""
    out: list[Section] = []
    for key in keys:
        title, fn = SECTIONS[key]
        sec = Section(key, title)
        cb = ((lambda d, t, _w="", k=key: progress(d, t, k)) if progress is not None
              else (lambda d, t, _w="", k=key: None))  # one signature for both (mypy)
        t0 = time.perf_counter()
        cb(0, None)  # the section starts now (its rate and time left count from here)
        try:
            fn(ctx, sec, cb)
        except Exception as e:  # noqa: BLE001 - a failing section is reported on the page
            sec.error = f"{type(e).__name__}: {e}".splitlines()[0][:500]
            sec.details = "".join(traceback.format_exception(e)[-6:])
        sec.elapsed_s = time.perf_counter() - t0
        out.append(sec)
    card = next((s for s in out if s.key == "model" and s.error is None), None)
    if card is not None:
        rows = [{"section": s.title, "seconds": round(s.elapsed_s or 0.0, 2),
                 "status": "failed" if s.error else "ok"} for s in out]
        card.data["timings_s"] = {s.key: s.elapsed_s for s in out}
        card.table(rows, caption="Time per section (wall clock)", sortable=False)
    return out


def write_report(sections: list[Section], out_dir: str | Path, *, title: str, subtitle: str = "",
                 meta: dict[str, Any] | None = None) -> Path:
    """Write ``index.html``, ``report.json`` and each section's CSV tables into ``out_dir``; returns the page."""
    d = ensure_output_dir(out_dir)
    for s in sections:
        for name, rows in s.tables.items():
            write_csv_atomic(d / name, rows)
    doc = {**(meta or {}), "sections": {
        s.key: {"title": s.title, "status": "failed" if s.error else "ok", "error": s.error,
                "elapsed_s": s.elapsed_s, "meaning": s.meaning, "data": s.data, "csv": sorted(s.tables)}
        for s in sections}}
    write_json_atomic(d / "report.json", _jsonable(doc))
    footer = (f"Made by sinkscope on {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. "
              "The numbers are in report.json and the CSV files next to this page.")
    index = d / "index.html"
    write_atomic(index, render_page(title, sections, subtitle=subtitle, footer=footer))
    return index


def _jsonable(x: Any) -> Any:
    import numpy as np

    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def build_report(model: nn.Module, tokenizer: Any, out_dir: str | Path, *, sections: Sequence[str] | None = None,
                 options: ReportOptions | None = None, model_spec: str = "", load_s: float | None = None,
                 progress: ProgressCallback | None = None) -> ReportResult:
    """Measure ``model`` and write the report into ``out_dir``.

    Args:
        model, tokenizer: a loaded causal LM of a supported architecture and its tokenizer.
        out_dir: output directory (created).
        sections: section keys (default: all, see `SECTION_ORDER`).
        options: measurement sizes (`ReportOptions`).
        model_spec: how the model was named (shown on the page).
        load_s: model load time to show on the model card.
        progress: ``progress(done, total, section_key)``: each section's own steps (`sinkscope.progress`).

    Returns:
        A `ReportResult`; ``result.failed`` lists sections that raised (they show their error on the page).
    """
    t0 = time.perf_counter()
    keys = parse_sections(sections)
    opts = options or ReportOptions()
    ctx = ReportContext(model=model, tokenizer=tokenizer, options=opts, model_spec=model_spec, load_s=load_s)
    secs = run_sections(ctx, keys, progress)
    total = time.perf_counter() - t0 + (load_s or 0.0)
    from sinkscope.versions import versions

    meta = {"model": model_spec, "options": dataclasses.asdict(opts), "versions": versions(),
            "sections_run": keys, "total_s": total}
    name = model_spec or getattr(getattr(model, "config", None), "model_type", "model")
    subtitle = (f"{len(keys)} section(s) in {total:.0f} s"
                + (f"; failed: {', '.join(s.key for s in secs if s.error)}" if any(s.error for s in secs) else ""))
    index = write_report(secs, out_dir, title=f"sinkscope report: {name}", subtitle=subtitle, meta=meta)
    return ReportResult(out_dir=Path(out_dir), index=index, sections=secs, total_s=total)
