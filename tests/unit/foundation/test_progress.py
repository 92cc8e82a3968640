"""sinkscope.progress: plain periodic lines when the output is not a terminal (a log file shows progress)."""

from __future__ import annotations

import io

from sinkscope.progress import ProgressReporter, format_seconds


def test_plain_lines_carry_count_rate_and_time_left() -> None:
    buf = io.StringIO()  # not a TTY: plain lines
    with ProgressReporter("scan cells", stream=buf, every_s=0.0, unit="cells") as report:
        report(1, 4, "word=poem")
        report(2, 4)
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("scan cells: 1/4 cells, 25%, ")
    assert "/s, elapsed 0:00, left " in lines[0] and lines[0].endswith("word=poem")
    assert lines[1].startswith("scan cells: 2/4 cells, 50%")


def test_lines_are_throttled_but_the_last_update_is_always_printed() -> None:
    buf = io.StringIO()
    with ProgressReporter("tokens", stream=buf, every_s=3600.0) as report:
        for i in range(1, 101):
            report(i, None)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2  # the first update, then the last one at exit
    assert lines[0].startswith("tokens: 1, ") and lines[1].startswith("tokens: 100, ")
    assert "left" not in lines[1]  # no total: no ETA


def test_a_finished_job_prints_its_final_line_even_when_throttled() -> None:
    buf = io.StringIO()
    with ProgressReporter("layers", stream=buf, every_s=3600.0) as report:
        report(1, 3)
        report(2, 3)
        report(3, 3)
    assert [ln.split(",")[0] for ln in buf.getvalue().splitlines()] == ["layers: 1/3", "layers: 3/3"]


def test_format_seconds() -> None:
    assert [format_seconds(s) for s in (0, 59.4, 61, 3600, -1)] == ["0:00", "0:59", "1:01", "1:00:00", "?"]
