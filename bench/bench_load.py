"""Benchmark: first load of a GGUF model (dequantise + write the safetensors cache) vs later loads from the cache.

    python bench/bench_load.py            # uses a fresh temporary cache, so the first load really dequantises
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

        t0 = time.perf_counter()
        load_model(args.model)
        print(f"{time.perf_counter() - t0:.2f}")
        return 0
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "SINKSCOPE_CACHE": cache}
        times = []
        for _ in range(3):
            res = subprocess.run([sys.executable, __file__, "--model", args.model, "--child"], env=env,
                                 capture_output=True, text=True, check=True)
            times.append(float(res.stdout.strip().splitlines()[-1]))
    print("| load | seconds | ratio to first |\n|---|---|---|")
    for i, t in enumerate(times):
        print(f"| {'first (dequantise + cache)' if i == 0 else f'cached #{i}'} | {t:.2f} | {t / times[0]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
