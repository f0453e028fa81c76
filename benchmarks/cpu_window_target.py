"""Issue 2's CPU target, measured alone: sliding window 257 at N=8192 vs dense SDPA (B=1, 16 heads, d=128, fp32).

Dense SDPA and ``attnlab.attention`` alternate for ``--rounds`` rounds (after one warm-up each), so both
see the same machine state; the speed-up is the ratio of medians, and every round's ratio is printed.

    python3 benchmarks/cpu_window_target.py --rounds 7
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import attnlab
from attnlab.core.patterns import sliding_window


def clock(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--window", type=int, default=257)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 16, args.n, 128, generator=g) for _ in range(3))
    pattern = sliding_window(args.window)
    dense = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    local = lambda: attnlab.attention(q, k, v, pattern=pattern)  # noqa: E731
    dense(), local()
    d_times, l_times = [], []
    for r in range(args.rounds):
        d_times.append(clock(dense))
        l_times.append(clock(local))
        print(f"round {r}: dense {d_times[-1] * 1e3:.0f} ms, window {l_times[-1] * 1e3:.1f} ms, "
              f"{d_times[-1] / l_times[-1]:.1f}x", flush=True)
    speedup = statistics.median(d_times) / statistics.median(l_times)
    print(f"N={args.n} window {args.window}: dense median {statistics.median(d_times) * 1e3:.0f} ms, window median "
          f"{statistics.median(l_times) * 1e3:.1f} ms -> {speedup:.1f}x (target >= 15x); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.machine()}, load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
