"""Benchmark: first load of a GGUF model (dequantise + write the safetensors cache) vs later loads from the cache.

    python bench/bench_load.py            # uses a fresh temporary cache, so the first load really dequantises

Each load runs in a new process; the table gives its wall time, the ratio to the first load, and the CPU time
the load itself used (``time.process_time`` in the child, all threads; imports excluded from both), which a busy
machine inflates far less than the wall time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        from sinkscope.models.load import load_model

        t0, c0 = time.perf_counter(), time.process_time()
        load_model(args.model)
        print(f"{time.perf_counter() - t0:.2f} {time.process_time() - c0:.2f}")
        return 0
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "SINKSCOPE_CACHE": cache}
        times, cpu = [], []
        for _ in range(3):
            res = subprocess.run([sys.executable, __file__, "--model", args.model, "--child"], env=env,
                                 capture_output=True, text=True, check=True)
            wall, used = res.stdout.strip().splitlines()[-1].split()
            times.append(float(wall))
            cpu.append(float(used))
    print(f"load average at the end: {' / '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| load | seconds | ratio to first | CPU seconds |\n|---|---|---|---|")
    for i, (t, c) in enumerate(zip(times, cpu, strict=True)):
        name = "first (dequantise + cache)" if i == 0 else f"cached #{i}"
        print(f"| {name} | {t:.2f} | {t / times[0]:.2f} | {c:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
