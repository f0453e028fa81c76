"""Per-forward extra time of head_mask, ZeroTuning, ACT and VAR over the unmodified SmolLM2 forward at 1K tokens.

Run: python3 benchmarks/interventions1_overhead.py [--tokens 1024] [--reps 3] [--threads N]
Writes benchmarks/results/interventions1_overhead.json and prints a markdown table. (The registry-wide
benchmark, apply included, is benchmarks/interventions_overhead.py.)
Heads are fixed, so the per-forward cost is measured, not the one-off calibration of apply: ZeroTuning 8
heads in layers 0-2 (and all 270 heads), ACT 8 heads in layers 10-12, VAR 16 heads in layers 10-19,
head_mask 8 heads. Plain and modified forwards alternate, so a busy machine slows both alike; medians of
wall and CPU time.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from attnlab.hf import load
from attnlab.interventions import act, head_mask, var, zerotuning
from attnlab.interventions.var import discover_sink_dims

HERE = Path(__file__).parent


def _forward(model, ids) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load()
    text = (HERE.parent / "README.md").read_text() * 4
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens]
    dims = discover_sink_dims(model, [ids[0, :256].tolist()])
    heads_act = [(10, 0), (10, 1), (10, 2), (11, 2), (12, 1), (11, 5), (12, 4), (10, 7)]
    heads_var = [(l, h) for l in range(10, 20) for h in (0, 3)][:16]
    setups = {
        "head_mask": lambda: head_mask(model, heads=[(l, 1) for l in range(0, 24, 3)]),
        "zerotuning": lambda: zerotuning(model, heads=[(0, 1), (0, 4), (1, 3), (1, 6), (1, 8), (2, 0), (2, 5), (2, 7)], gamma=1.5),
        "zerotuning_all_heads": lambda: zerotuning(model, heads="all", gamma=1.5),
        "act": lambda: act(model, heads=heads_act),
        "var": lambda: var(model, heads=heads_var, sink_dims=dims),
    }
    _forward(model, ids)  # warm-up
    rows = {}
    for name, make in setups.items():
        plain, modified = [], []
        for _ in range(args.reps):
            plain.append(_forward(model, ids))
            with make():
                modified.append(_forward(model, ids))
        row = {}
        for i, clock in enumerate(("wall", "cpu")):
            p = statistics.median(t[i] for t in plain)
            m = statistics.median(t[i] for t in modified)
            row[clock] = dict(plain_s=p, modified_s=m, extra_pct=100 * (m / p - 1))
        rows[name] = row
        print(f"{name}: " + "; ".join(f"{c} plain {row[c]['plain_s']:.3f} s, modified {row[c]['modified_s']:.3f} s "
                                      f"({row[c]['extra_pct']:+.1f}%)" for c in ("wall", "cpu")), flush=True)
    meta = dict(tokens=int(ids.shape[1]), reps=args.reps, torch=torch.__version__, threads=torch.get_num_threads(),
                cpu=platform.processor() or platform.machine(), sink_dims=list(dims))
    (HERE / "results" / "interventions1_overhead.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"\n| intervention ({meta['tokens']} tokens) | clock | plain (s) | modified (s) | extra |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        for c in ("cpu", "wall"):
            print(f"| {name} | {c} | {row[c]['plain_s']:.3f} | {row[c]['modified_s']:.3f} | {row[c]['extra_pct']:+.1f}% |")


if __name__ == "__main__":
    main()
