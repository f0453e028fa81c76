"""CPU: grouped dense attention (kernels/grouped_dense.py) vs the path attnlab took before it
(FlexAttention or the banded SDPA path) on patterns whose queries share key windows.

B=1, 4 heads, D=64, float32. The two paths run interleaved (A, B, A, B, ...) so that load from other
processes hits both alike; the table gives the minimum and the median of REPEATS calls each, after
one warm-up call (FlexAttention's compile is not timed). Command:
`PYTHONPATH=src python3 benchmarks/cpu_grouped.py [--threads N]`.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from attnlab import attention
from attnlab.core.patterns import blocked, document, neighborhood
from attnlab.kernels import banded
from attnlab.kernels import grouped_dense as gd

H, D, REPEATS = 4, 64, 5
CASES = [
    ("1D strided N=8192 k=512 s=64", neighborhood(8192, 512, stride=64)),
    ("1D strided N=8192 k=256 s=16", neighborhood(8192, 256, stride=16)),
    ("1D HaloNet N=8192 block 64 halo 32", blocked(8192, 64, 32)),
    ("2D strided 64x64 k=24 s=8", neighborhood((64, 64), 24, stride=8)),
    ("2D strided 64x64 k=12 s=4", neighborhood((64, 64), 12, stride=4)),
    ("2D HaloNet 64x64 block 8 halo 4", blocked((64, 64), 8, 4)),
    ("3D strided 16x16x16 k=8 s=4", neighborhood((16, 16, 16), 8, stride=4)),
    ("documents 4 x 2048", document([2048] * 4)),
]


def previous_kernel(q, k, pattern) -> str:
    """What ``kernel="auto"`` chose on CPU before grouped dense existed (rules 6-7 of attention.py)."""
    band = banded.plan(pattern, q.shape[2], k.shape[2], q.device)
    if band is not None and (band.strided_fraction >= 0.5 or band.gathered_blocks <= 8):
        return "banded"
    return "flex"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; B=1, H={H}, D={D}, float32; ms\n")
    print("| case | density | mean group | before: kernel | before min / median | grouped min / median | speed-up (medians) |")
    print("|---|---|---|---|---|---|---|")
    for name, p in CASES:
        n = p.n_tokens if hasattr(p, "n_tokens") else sum(p.lengths)
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, H, n, D, generator=g) for _ in range(3))
        before = previous_kernel(q, k, p)
        fns = {"before": lambda: attention(q, k, v, pattern=p, kernel=before),
               "grouped": lambda: attention(q, k, v, pattern=p, kernel="grouped")}
        times: dict[str, list[float]] = {key: [] for key in fns}
        for fn in fns.values():
            fn()
        for _ in range(REPEATS):
            for key, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[key].append((time.perf_counter() - t) * 1e3)
        b, gr = times["before"], times["grouped"]
        plan = gd.cached_plan(p, n, n)
        print(f"| {name} | {p.density(n, n):.4f} | {plan.mean_group:.0f} | {before} | {min(b):.0f} / {statistics.median(b):.0f} "
              f"| {min(gr):.0f} / {statistics.median(gr):.0f} | {statistics.median(b) / statistics.median(gr):.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
