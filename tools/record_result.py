"""Copy a command's small output files into ``docs/results/`` with a ``command.json`` sidecar saying how they were made.

    python tools/record_result.py SRC_DIR DEST_DIR --command "sinkscope scan ..." [--files profile.json,heads.csv]
        [--note "..."] [--log LOGFILE]

``command.json`` holds the command, the last commit that changed the code it ran,
the date, the machine's load average at recording time, the copied files and an optional note; ``--log`` also
copies the command's terminal output (as ``stdout.txt``). Big raw outputs are not copied: pick the small files
the docs read, or summarise first. Not part of the package (the package never imports ``tools/``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """The last commit of this checkout that changed code (src/, bench/, configs/, experiments/): the code the
    command ran (docs-only commits on top do not change it), or ``unknown`` outside a git work tree."""
    try:
        return subprocess.run(["git", "log", "-1", "--format=%h", "--", "src", "bench", "configs", "experiments"],
                              cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def record(src: Path, dest: Path, command: str, files: list[str], note: str = "", log: Path | None = None) -> Path:
    """Copy ``files`` from ``src`` to ``dest`` and write ``dest/command.json``; returns the sidecar's path."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in files:
        shutil.copyfile(src / name, dest / name)
    copied = list(files)
    if log is not None:
        shutil.copyfile(log, dest / "stdout.txt")
        copied.append("stdout.txt")
    meta = {"command": command, "code_commit": git_commit(),
            "recorded": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average_at_recording": [round(x, 2) for x in os.getloadavg()], "files": copied}
    if note:
        meta["note"] = note
    out = dest / "command.json"
    out.write_text(json.dumps(meta, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path)
    p.add_argument("dest", type=Path)
    p.add_argument("--command", required=True)
    p.add_argument("--files", default="", help="comma-separated file names in SRC to copy")
    p.add_argument("--note", default="")
    p.add_argument("--log", type=Path, default=None, help="the command's terminal output, copied as stdout.txt")
    a = p.parse_args(argv)
    files = [f for f in a.files.split(",") if f]
    print(record(a.src, a.dest, a.command, files, a.note, a.log))
    return 0


if __name__ == "__main__":
    sys.exit(main())
