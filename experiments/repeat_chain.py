"""Run the repeated-token chain (patches, their evaluation, scan, circuit, cluster attack) from one YAML file.

An option key ending in ``_<digit>`` repeats the option (``patch_2: DIR`` adds a second ``--patch DIR``).
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import yaml

from sinkscope.cli.__main__ import main as cli

#: steps that take --model; the others read the base model from the saved patch
MODEL_STEPS = ("scan", "circuit", "patch")
CORPUS_STEPS = ("circuit", "patch", "evaluate")
OUT_FLAG = {"scan": "--out", "circuit": "--out", "patch": "--save", "evaluate": "--out", "cluster": "--out"}


def run(config_path: str, only: list[str] | None = None) -> int:
    cfg = yaml.safe_load(Path(config_path).read_text())
    out = Path(cfg["out"])
    corpus = Path(cfg["corpus"]) if cfg.get("corpus") and Path(cfg["corpus"]).is_file() else None
    for name, opts in cfg["steps"].items():
        if only and name not in only:
            continue
        opts = dict(opts or {})
        command = opts.pop("command", name)
        argv = ["repeat", command, OUT_FLAG[command], str(out / name)]
        if command in MODEL_STEPS:
            argv += ["--model", cfg["model"]]
        takes_corpus = command in CORPUS_STEPS and not (command == "patch" and opts.get("method", "dedup") == "dedup")
        if takes_corpus and corpus is not None and "corpus" not in opts:  # a step's own corpus wins
            argv += ["--corpus", str(corpus)]
        for k, v in opts.items():
            k = re.sub(r"_\d+$", "", k)  # patch_2: a second --patch
            argv += [f"--{k}"] if v in ("", None) else [f"--{k}", str(v).format(out=out)]
        print(f"$ sinkscope {' '.join(argv)}", flush=True)
        t0 = time.perf_counter()
        rc = cli(argv)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2:] or None))
