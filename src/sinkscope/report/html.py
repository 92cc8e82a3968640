"""Self-contained HTML pages: sections of text, embedded figures (base64 PNG) and sortable tables; no CDN,
no external file, a few lines of inline JavaScript for sorting.

`Section` collects the content of one part of a report; `render_page` turns sections into one HTML string.
A section with ``error`` set renders as a red box with the error (the other sections are unaffected).
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sinkscope.io import figure_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def esc(x: Any) -> str:
    """HTML-escape ``str(x)``."""
    return html.escape(str(x), quote=True)


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """PNG bytes of a figure; the figure is closed."""
    return figure_bytes(fig, "png", dpi)


def figure_html(fig: Figure, caption: str = "", dpi: int = 100) -> str:
    """``<figure>`` with the figure embedded as a base64 PNG data URI (closes the figure)."""
    data = base64.b64encode(figure_png(fig, dpi)).decode("ascii")
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{esc(caption or "figure")}" src="data:image/png;base64,{data}">{cap}</figure>'


def format_value(v: Any, digits: int = 3) -> str:
    """Compact display of a table cell: floats with ``digits`` significant digits, None/NaN as an en dash."""
    if v is None:
        return "\u2013"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "\u2013"
        if v != 0 and (abs(v) >= 10 ** 5 or abs(v) < 10 ** -3):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}" if abs(v) >= 1 else f"{v:.{digits}f}"
    return str(v)


def _sort_key(v: Any) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, (int, float)):
        return repr(float(v)) if math.isfinite(float(v)) else "-1e308"
    return str(v)


def _cls(v: Any) -> str:
    return ' class="t"' if isinstance(v, str) else ""


def table_html(rows: list[dict[str, Any]], *, columns: list[str] | None = None, caption: str = "",
               sortable: bool = True, max_rows: int | None = None, table_id: str | None = None) -> str:
    """An HTML table of ``rows`` (dicts); with ``sortable``, clicking a header sorts by that column
    (numerically where the cells are numbers). ``max_rows`` keeps the first rows and says how many were left."""
    if not rows:
        return f"<p class=\"empty\">{esc(caption)}: no rows.</p>"
    cols = columns or list(rows[0])
    shown = rows[:max_rows] if max_rows else rows
    head = "".join(f'<th data-col="{esc(c)}" title="click to sort">{esc(c)}</th>' for c in cols)
    body = "".join(
        "<tr>" + "".join(f'<td{_cls(r.get(c))} data-v="{esc(_sort_key(r.get(c)))}">{esc(format_value(r.get(c)))}'
                         "</td>" for c in cols) + "</tr>"
        for r in shown)
    more = (f"<p class=\"note\">Showing {len(shown)} of {len(rows)} rows; all rows are in the CSV next to this "
            "page.</p>" if len(shown) < len(rows) else "")
    cls = "sortable" if sortable else "plain"
    tid = f' id="{esc(table_id)}"' if table_id else ""
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return (f'<div class="table-wrap"><table class="{cls}"{tid}>{cap}<thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>{more}")


@dataclass
class Section:
    """The content of one report section, built in order.

    Attributes:
        key: short id (HTML anchor, ``--sections`` name).
        title: heading.
        parts: HTML fragments, in display order.
        meaning: paragraphs of the "what this means" box (plain text).
        data: JSON-ready numbers the section was made from.
        tables: CSV files to write next to the page: file name -> rows.
        elapsed_s: wall time of the section.
        error: one-line error when the section failed (its parts may be partial).
        details: longer error details (traceback tail), shown folded.
    """

    key: str
    title: str
    parts: list[str] = field(default_factory=list)
    meaning: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    elapsed_s: float | None = None
    error: str | None = None
    details: str | None = None

    def text(self, s: str) -> None:
        """Add a paragraph of plain text."""
        self.parts.append(f"<p>{esc(s)}</p>")

    def raw(self, fragment: str) -> None:
        """Add an HTML fragment (caller escapes)."""
        self.parts.append(fragment)

    def figure(self, fig: Figure, caption: str = "") -> None:
        """Add a matplotlib figure (embedded as PNG; the figure is closed)."""
        self.parts.append(figure_html(fig, caption))

    def table(self, rows: list[dict[str, Any]], *, caption: str = "", columns: list[str] | None = None,
              sortable: bool = True, max_rows: int | None = None, csv: str | None = None) -> None:
        """Add a table; with ``csv``, also write all rows to that file next to the page."""
        tid = f"{self.key}-{csv.rsplit('.', 1)[0]}" if csv else None
        self.parts.append(table_html(rows, columns=columns, caption=caption, sortable=sortable,
                                     max_rows=max_rows, table_id=tid))
        if csv:
            self.tables[csv] = rows

    def explain(self, s: str) -> None:
        """Add a paragraph to the section's "what this means" box."""
        self.meaning.append(s)

    def body_html(self) -> str:
        err = ""
        if self.error is not None:
            det = (f"<details><summary>details</summary><pre>{esc(self.details)}</pre></details>"
                   if self.details else "")
            err = f'<div class="error" role="alert"><strong>This section failed:</strong> {esc(self.error)}{det}</div>'
        mean = ""
        if self.meaning and self.error is None:
            mean = ('<div class="meaning"><h3>What this means</h3>'
                    + "".join(f"<p>{esc(p)}</p>" for p in self.meaning) + "</div>")
        took = f'<span class="took">{self.elapsed_s:.1f} s</span>' if self.elapsed_s is not None else ""
        status = "failed" if self.error is not None else "ok"
        return (f'<section id="{esc(self.key)}" class="report-section {status}" data-status="{status}">'
                f"<h2>{esc(self.title)} {took}</h2>{err}{mean}{''.join(self.parts)}</section>")


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;margin:0 auto;padding:1em 2em;
color:#222;line-height:1.45}
h1{margin-bottom:.1em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
.took{font-size:.6em;color:#888;font-weight:normal}.sub{color:#666;margin-top:0}
nav ul{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:.4em 1.2em}
nav a.failed{color:#b00}
.meaning{background:#f3f7ff;border-left:4px solid #4a7bd0;padding:.3em 1em;margin:1em 0}
.meaning h3{margin:.4em 0;font-size:1em}
.error{background:#fff0f0;border-left:4px solid #c00;padding:.6em 1em;margin:1em 0}
pre{white-space:pre-wrap;font-size:.8em}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}
.table-wrap{max-height:36em;overflow:auto;margin:1em 0}
table{border-collapse:collapse;font-size:.85em}caption{text-align:left;font-weight:bold;padding:.3em 0}
th,td{border:1px solid #ddd;padding:.2em .5em;text-align:right}th{background:#f4f4f4;position:sticky;top:0}
td.t{text-align:left}
table.sortable th{cursor:pointer}th[aria-sort=ascending]::after{content:" \\25B2"}
th[aria-sort=descending]::after{content:" \\25BC"}
.note,.empty{font-size:.85em;color:#666}
footer{margin-top:3em;font-size:.8em;color:#888}
"""

#: Click-to-sort for ``table.sortable`` (numbers numerically, text alphabetically; click again to reverse).
SORT_JS = """
(function () {
  function sortBy(th) {
    var table = th.closest('table'), body = table.tBodies[0];
    var idx = Array.prototype.indexOf.call(th.parentNode.children, th);
    var asc = th.getAttribute('aria-sort') !== 'ascending';
    Array.prototype.forEach.call(table.querySelectorAll('th'), function (o) { o.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[idx].getAttribute('data-v'), y = b.cells[idx].getAttribute('data-v');
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny) && isFinite(x) && isFinite(y)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  Array.prototype.forEach.call(document.querySelectorAll('table.sortable th'), function (th) {
    th.addEventListener('click', function () { sortBy(th); });
  });
  window.sinkscopeSort = sortBy;
})();
"""


def render_page(title: str, sections: list[Section], *, subtitle: str = "", footer: str = "") -> str:
    """One self-contained HTML page: title, a table of contents, the sections in order, a footer."""
    nav = "".join(
        f'<li><a href="#{esc(s.key)}" class="{"failed" if s.error is not None else "ok"}">{esc(s.title)}'
        f'{" (failed)" if s.error is not None else ""}</a></li>' for s in sections)
    body = "".join(s.body_html() for s in sections)
    sub = f'<p class="sub">{esc(subtitle)}</p>' if subtitle else ""
    foot = f"<footer>{esc(footer)}</footer>" if footer else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        '<link rel="icon" href="data:,">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{esc(title)}</h1>{sub}<nav><ul>{nav}</ul></nav></header>"
        f"<main>{body}</main>{foot}<script>{SORT_JS}</script></body></html>\n"
    )
