"""Time the analytic block layout of every pattern at N = 65536 with 128 x 128 tiles (CPU).

Run: python3 benchmarks/block_layout_time.py  (target: each < 0.1 s; issue 2). Prints, per pattern,
the first build (the one the target is about: it also fills small per-pattern caches of box lists)
in wall and in CPU time of this process (CPU time is less disturbed by other jobs on shared cores),
the best of 5 later builds, element density and block density (fraction of tiles visited).
"""
from __future__ import annotations

import os
import time

import torch

import attnlab as al

N, BLOCK = 65536, 128


def patterns():
    lay = torch.rand(N // BLOCK, N // BLOCK, generator=torch.Generator().manual_seed(0)) < 0.1
    nb2 = al.neighborhood((256, 256), 33)
    nb3 = al.neighborhood((16, 64, 64), (5, 9, 9))
    return [
        al.causal(),
        al.sliding_window(4097),
        al.sliding_window(4096, causal=True),
        al.prefix_lm(1000),
        al.document([1000, 30000, 20536, 14000]),
        al.document([1000, 30000, 20536, 14000]) & al.causal(),
        al.block_sparse(lay, BLOCK),
        al.neighborhood(N, 4097),
        al.neighborhood(N, 1025, dilation=4, stride=2, causal=True),
        nb2,
        nb2.permuted(),
        al.neighborhood((256, 256), (32, 32), stride=(16, 16)).permuted(),
        al.neighborhood((256, 256), 17, dilation=3).permuted(),
        nb3,
        nb3.permuted(),
        al.blocked((256, 256), 8, 3),
        al.blocked((256, 256), 8, 3).permuted(),
        # Grids the tiles do not divide: blocks straddle rows / edge tiles (several boxes each).
        al.neighborhood((255, 257), 33),
        al.neighborhood((255, 257), 33).permuted(),
        al.neighborhood((100, 655), 31, stride=(3, 5)),
        al.neighborhood((40, 41, 40), 7),
        al.neighborhood((40, 41, 40), 7, dilation=(2, 3, 2)).permuted(),
        al.neighborhood(N, 257, dilation=16),
        al.neighborhood(N, 257, dilation=16).permuted(),
        al.blocked((255, 257), 7, 3).permuted(),
    ]


def timed(fn, repeats=5):
    """(first wall s, first CPU s of this process, best wall s of `repeats` more)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    first, first_cpu = time.perf_counter() - wall, time.process_time() - cpu
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return first, first_cpu, best


def main() -> None:
    torch.set_num_threads(1)  # small ops: a thread pool only adds wake-up latency
    print(f"block layout build time, N={N}, tiles {BLOCK}x{BLOCK}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"load average (other processes share these 2 cores): {os.getloadavg()}")
    print(f"{'pattern':70s} {'first s':>8s} {'cpu s':>8s} {'best s':>8s} {'density':>8s} {'blocks':>8s}")
    worst = worst_cpu = 0.0
    for p in patterns():
        n = p.base.n_tokens if hasattr(p, "base") else getattr(p, "n_tokens", N)
        first, first_cpu, best = timed(lambda: p.block_layout(n, n, BLOCK, BLOCK))
        worst, worst_cpu = max(worst, first), max(worst_cpu, first_cpu)
        layout = p.block_layout(n, n, BLOCK, BLOCK)
        print(f"{repr(p)[:70]:70s} {first:8.4f} {first_cpu:8.4f} {best:8.4f} {p.density(n, n):8.4f} {layout.density:8.4f}")
    print(f"slowest first build: {worst:.4f} s wall, {worst_cpu:.4f} s CPU; target < 0.1 s: "
          f"{'met' if worst < 0.1 else 'NOT met'} (wall), {'met' if worst_cpu < 0.1 else 'NOT met'} (CPU)")


if __name__ == "__main__":
    main()
