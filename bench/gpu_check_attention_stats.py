"""GPU check of the fused attention statistics: fused vs chunked vs SDPA on CUDA (synthetic SmolLM2-shaped heads).

    PYTHONPATH=src python bench/gpu_check_attention_stats.py --lengths 2048,8192
Prints, per length, the wall time of SDPA, the fused and the chunked statistics (best of 3) and their largest
differences, in fp32 and with bf16 inputs.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from sinkscope.metrics.attention_stats import attention_with_stats


def _best(fn, k: int = 3) -> float:
    times = []
    for _ in range(k):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2048,8192")
    args = ap.parse_args()
    dev = torch.device("cuda")
    H, Hkv, D = 9, 3, 64
    for T in (int(x) for x in args.lengths.split(",")):
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator(device=dev).manual_seed(T)
            q = torch.randn(1, T, H, D, device=dev, generator=g).transpose(1, 2).to(dtype)
            k = torch.randn(1, T, Hkv, D, device=dev, generator=g).transpose(1, 2).to(dtype)
            k[:, :, 0] *= 4
            v = torch.randn(1, T, Hkv, D, device=dev, generator=g).transpose(1, 2).to(dtype)
            valid = torch.ones(1, T, dtype=torch.bool, device=dev)
            kw = dict(scaling=D**-0.5, query_valid=valid, key_valid=valid)
            t_sdpa = _best(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
            t_fused = _best(lambda: attention_with_stats(q, k, v, **kw))
            t_chunk = _best(lambda: attention_with_stats(q, k, v, method="chunked", **kw))
            _, a = attention_with_stats(q, k, v, **kw)
            _, b = attention_with_stats(q, k, v, method="chunked", **kw)
            d_alpha = (a.alpha - b.alpha).abs().max().item()
            d_cos = (a.cos_other - b.cos_other).abs().max().item() / T
            print(f"T={T} {str(dtype):15s} method={a.method} sdpa {t_sdpa * 1e3:.2f} ms, fused {t_fused * 1e3:.2f} ms "
                  f"({t_fused / t_sdpa:.1f}x), chunked {t_chunk * 1e3:.2f} ms ({t_chunk / t_sdpa:.1f}x); "
                  f"max |alpha diff| {d_alpha:.2e}, cos_other {d_cos:.2e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
