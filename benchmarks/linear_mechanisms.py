"""Forward time of the linear-family mechanisms vs softmax attention (SDPA) at growing N.

Times the core attention math on (B, H, N, D) tensors (projections excluded, the same for all):
softmax through ``attnlab.attention`` (SDPA; causal via ``causal()``), lightning attention
(ALiBi-slope decay when causal; on CUDA the fused Triton kernel, "lightning torch" the PyTorch loop,
which is the CPU path: benchmarks/h200_lightning.py is the dedicated H200 table), Flowformer's flow attention (sigmoid features), InLine's injective
linear attention (no local residual), and CLEAR's 1-D local window (radius r: 2r - 1 keys, or r
causal). Each entry is the best of ``--reps`` runs after one warm-up; ``us/token`` is time / N.

CPU (this project's machine, results committed):
    python3 benchmarks/linear_mechanisms.py --out benchmarks/results/cpu_linear_mechanisms
CUDA (the lead's H200 run; paper 46's setting b4 h32 d128 bf16, constant time per token to 64K):
    python3 benchmarks/linear_mechanisms.py --device cuda --dtype bfloat16 --batch 4 --heads 32 \
        --dim 128 --block 256 --lengths 1024 4096 16384 65536 --out benchmarks/results/h200_linear_mechanisms
Writes OUT.json and OUT.md (the markdown table, with the command and machine load).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from attnlab import attention, causal as causal_pattern
from attnlab.mechanisms.clear import clear_attention
from attnlab.mechanisms.flowformer import flow_attention
from attnlab.mechanisms.inline import inline_attention
from attnlab.mechanisms.lightning import decay_slopes, lightning_attention


def mechanisms(causal: bool, block: int, radius: int) -> dict:
    """name -> f(q, k, v) for one attention mode."""
    return {
        "softmax (SDPA)": lambda q, k, v: attention(q, k, v, pattern=causal_pattern() if causal else None),
        # On CUDA, causal lightning runs the fused Triton kernel; "lightning torch" is the PyTorch loop.
        "lightning": lambda q, k, v: lightning_attention(
            q, k, v, causal=causal, decay=decay_slopes(q.shape[1]) if causal else None, block=block
        ),
        "lightning torch": lambda q, k, v: lightning_attention(
            q, k, v, causal=causal, decay=decay_slopes(q.shape[1]) if causal else None, block=block, kernel="torch"
        ),
        "flowformer": lambda q, k, v: flow_attention(torch.sigmoid(q), torch.sigmoid(k), v, causal=causal),
        "inline": lambda q, k, v: inline_attention(q, k, v, causal=causal),
        f"clear 1-D r={radius}": lambda q, k, v: clear_attention(q, k, v, radius=radius, causal=causal),
    }


def best_seconds(fn, args, reps: int, device: str) -> tuple[float, float]:
    """(wall, cpu) seconds, each the best of ``reps``. CPU time is this process's (time.process_time):
    on a shared machine with --threads 1 it is the fairer measure, as waiting for a core does not count."""
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        fn(*args)  # warm-up (FlexAttention/SDPA paths, caches)
        sync()
        wall = cpu = float("inf")
        for _ in range(reps):
            t, c = time.perf_counter(), time.process_time()
            fn(*args)
            sync()
            wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return wall, cpu


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--block", type=int, default=64, help="lightning tile (paper: 64)")
    ap.add_argument("--radius", type=int, default=32, help="CLEAR 1-D radius")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--modes", nargs="+", default=["causal", "noncausal"], choices=["causal", "noncausal"])
    ap.add_argument("--only", nargs="+", default=None,
                    help="run only mechanisms whose name starts with one of these (softmax included only if named)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", default=None, help="path prefix for OUT.json and OUT.md")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    load = round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None
    for mode in args.modes:
        for n in args.lengths:
            g = torch.Generator().manual_seed(n)
            q, k, v = (
                torch.randn(args.batch, args.heads, n, args.dim, generator=g).to(args.device, dtype) for _ in range(3)
            )
            base = (float("nan"), float("nan"))  # softmax runs first when it runs at all
            for name, fn in mechanisms(mode == "causal", args.block, args.radius).items():
                if args.only and not any(name.startswith(o) for o in args.only):
                    continue
                s, c = best_seconds(fn, (q, k, v), args.reps, args.device)
                base = (s, c) if name.startswith("softmax") else base
                ratio = lambda a, b: None if a != a else a / b  # noqa: E731  (NaN: softmax not run)
                rows.append({"mode": mode, "n": n, "mechanism": name, "seconds": s, "cpu_seconds": c,
                             "us_per_token": s / n * 1e6, "speedup_vs_softmax": ratio(base[0], s),
                             "cpu_speedup_vs_softmax": ratio(base[1], c)})
                print(f"{mode:9s} N={n:6d} {name:16s} {s * 1e3:10.2f} ms wall {c * 1e3:10.2f} ms cpu  "
                      f"{s / n * 1e6:8.2f} us/token  x{base[0] / s:6.2f} (cpu x{base[1] / c:6.2f}) vs softmax", flush=True)
    meta = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
            "device": args.device if args.device != "cuda" else torch.cuda.get_device_name(),
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "shape": f"B={args.batch} H={args.heads} D={args.dim} {args.dtype}",
            "load_avg_1min_at_start": load, "load_avg_1min_at_end": round(os.getloadavg()[0], 1) if load is not None else None}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        lines = [f"# Linear-family mechanisms vs softmax, forward only ({meta['device']}, {meta['shape']})", "",
                 f"Command: `python3 benchmarks/{meta['command']}`; torch {meta['torch']}, {meta['threads']} threads; "
                 f"1-min load average {load} at start, {meta['load_avg_1min_at_end']} at end. Best of {args.reps}.", "",
                 "| mode | N | mechanism | wall ms | CPU ms | us/token (wall) | vs softmax (wall) | vs softmax (CPU) |",
                 "|---|---|---|---|---|---|---|---|"]
        show = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
        lines += [f"| {r['mode']} | {r['n']} | {r['mechanism']} | {r['seconds'] * 1e3:.2f} | {r['cpu_seconds'] * 1e3:.2f} | "
                  f"{r['us_per_token']:.2f} | {show(r['speedup_vs_softmax'])} | {show(r['cpu_speedup_vs_softmax'])} |"
                  for r in rows]
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
