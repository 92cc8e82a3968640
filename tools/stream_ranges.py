"""Summarise a ``sinkscope stream eval`` run's ``tokens.csv`` into perplexities per position range (small enough
to commit where the per-token CSV is not).

    python tools/stream_ranges.py RUN_DIR OUT.json [--ranges 1-1024,1025-8191,...]

Writes ``{"command": ..., "source": ..., "ranges": {policy: {"A-B": {"ppl": .., "tokens": ..}}}}``; "all" is
every scored token, "after eviction" the tokens from ``summary.json``'s ``eviction_starts_at_position`` on.
Positions are those of ``tokens.csv`` (the index of the predicted token in the stream).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

DEFAULT_RANGES = "1-1024,1025-8191,8192-9215,9216-16383,16384-32767,32768-65535"


def summarise(run: Path, ranges: list[tuple[int, int]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per policy and range: perplexity (exp of the mean NLL) and the number of tokens."""
    evict = json.loads((run / "summary.json").read_text())["eviction_starts_at_position"]
    nll: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(run / "tokens.csv", newline="") as f:
        for row in csv.DictReader(f):
            nll[row["policy"]].append((int(row["position"]), float(row["nll"])))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for policy, values in nll.items():
        picks = {f"{a}-{b}": [v for p, v in values if a <= p <= b] for a, b in ranges}
        picks["all"] = [v for _, v in values]
        picks["after eviction"] = [v for p, v in values if p >= evict]
        out[policy] = {k: {"ppl": math.exp(sum(v) / len(v)), "tokens": len(v)} for k, v in picks.items() if v}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--ranges", default=DEFAULT_RANGES)
    a = p.parse_args(argv)
    ranges = [tuple(int(x) for x in r.split("-")) for r in a.ranges.split(",")]
    data = {"command": "python tools/stream_ranges.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "source": str(a.run / "tokens.csv"), "ranges": summarise(a.run, ranges)}  # type: ignore[arg-type]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(data, indent=1) + "\n")
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
