"""sinkscope.io: strict JSON lines that survive a torn write, and the lock that stops two jobs sharing an --out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sinkscope.errors import InputError
from sinkscope.io import LOCK_NAME, OutputLock, append_jsonl, read_jsonl


def test_append_writes_strict_json_and_read_drops_a_torn_last_line(tmp_path: Path) -> None:
    p = tmp_path / "cells.jsonl"
    append_jsonl(p, {"a": 1, "d3": float("nan")}, {"a": 2, "x": float("inf")})
    text = p.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert [json.loads(line) for line in text.splitlines()] == [{"a": 1, "d3": None}, {"a": 2, "x": None}]
    with open(p, "a") as f:  # a crash mid-write
        f.write('{"a": 3, "tr')
    assert read_jsonl(p) == [{"a": 1, "d3": None}, {"a": 2, "x": None}]
    append_jsonl(p, {"a": 4})  # the next append cuts the torn line off first
    assert [r["a"] for r in read_jsonl(p)] == [1, 2, 4]


def test_a_bad_line_in_the_middle_is_an_error_naming_the_line(tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl"
    p.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(InputError, match="line 2 is not JSON"):
        read_jsonl(p)
    assert read_jsonl(tmp_path / "missing.jsonl") == []
    with pytest.raises(InputError, match="not found"):
        read_jsonl(tmp_path / "missing.jsonl", missing_ok=False)


def test_a_second_process_is_refused_while_the_lock_is_held(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = ("import sys; from sinkscope.io import OutputLock; from sinkscope.errors import InputError\n"
            "try:\n    OutputLock(sys.argv[1]).acquire()\nexcept InputError as e:\n    print(e); sys.exit(2)\n")
    with OutputLock(out):
        held = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True)
    assert held.returncode == 2 and "in use by another sinkscope job" in held.stdout
    free = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True)
    assert free.returncode == 0, free.stdout + free.stderr  # released at exit (and by the kernel on a crash)
    assert (out / LOCK_NAME).exists()


def test_the_lock_refuses_an_output_path_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputError, match="not a directory|cannot create"):
        OutputLock(f).acquire()
