"""Time every registered intervention against the unmodified forward: SmolLM2, 1,024 tokens, prefill.

Run: python3 benchmarks/interventions_overhead.py [--tokens 1024] [--reps 5] [--threads 1] [--names act var ...]
Writes benchmarks/results/interventions_overhead.json and prints a markdown table.

For each intervention in ``attnlab.interventions.INTERVENTIONS``: apply it once with the first entry
of its grid (calibration: 2 x 64 tokens of the bundled KJV text; not timed), time ``--reps``
intervened forwards, and as many unmodified forwards split right before applying and right after
detaching (so both see about the same machine load); report the best (minimum) of each and the overhead best_intervened / best_plain - 1, in wall time
and in this process's CPU time. One torch thread by default: process CPU time then counts this
forward's work only, which other processes' load barely distorts (wall time does not). The primitives get explicit heads: head 0 of every layer (every
layer's attention call pays the modifier). The target is < 10% extra.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from importlib.resources import files
from pathlib import Path

import torch

from attnlab.hf import load
from attnlab.interventions import INTERVENTIONS

PRIMITIVE_ARGS = {
    "head_mask": lambda n_layers: dict(heads=[(layer, 0) for layer in range(n_layers)]),
    "head_scale": lambda n_layers: dict(heads=[(layer, 0) for layer in range(n_layers)], scale=1.5),
}


def forward_seconds(model, ids) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is the fair clock)")
    parser.add_argument("--names", nargs="*", default=None, help="registry names (default: all)")
    parser.add_argument("--out", default="interventions_overhead.json", help="file name under benchmarks/results/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load()
    n_layers = model.config.num_hidden_layers
    ids = tokenizer(files("attnlab.data").joinpath("kjv_genesis.txt").read_text())["input_ids"]
    calibration = [ids[0:64], ids[64:128]]
    x = torch.tensor([ids[2000:2000 + args.tokens]])
    forward_seconds(model, x)  # warm-up
    rows = []
    out = Path(__file__).parent / "results" / args.out
    for name in args.names or list(INTERVENTIONS):
        entry = INTERVENTIONS[name]
        hyper = dict(entry.grid[0], **PRIMITIVE_ARGS.get(name, lambda n: {})(n_layers))
        plain, modified = [], []
        for _ in range(args.reps - args.reps // 2):  # plain rounds right before applying ...
            plain.append(forward_seconds(model, x))
        t0 = time.perf_counter()
        handle = entry.apply(model, tokenizer, calibration, **hyper)
        setup = time.perf_counter() - t0
        try:
            for _ in range(args.reps):
                modified.append(forward_seconds(model, x))
        finally:
            handle.detach()
        for _ in range(args.reps // 2):  # ... and right after detaching, so both see the same load
            plain.append(forward_seconds(model, x))
        row = dict(name=name, hyper={k: v for k, v in hyper.items() if k != "heads"}, setup_s=setup)
        for i, clock in enumerate(("wall", "cpu")):
            p, m = min(t[i] for t in plain), min(t[i] for t in modified)
            row[clock] = dict(plain_s=p, intervened_s=m, overhead_pct=100 * (m / p - 1),
                              plain_all=[t[i] for t in plain], intervened_all=[t[i] for t in modified])
        rows.append(row)
        print(f"{name}: setup {setup:.1f} s; " + "; ".join(
            f"{c}: plain {row[c]['plain_s']:.3f} s, intervened {row[c]['intervened_s']:.3f} s ({row[c]['overhead_pct']:+.1f}%)"
            for c in ("cpu", "wall")), flush=True)
        out.write_text(json.dumps(dict(meta=meta(args), rows=rows), indent=1))
    print(markdown(rows))


def meta(args) -> dict:
    return dict(model="SmolLM2-135M-Instruct (dequantized Q4_1), float32", tokens=args.tokens, reps=args.reps,
                torch=torch.__version__, threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine(),
                input="KJV Genesis tokens 2000-3023, prefill, use_cache=False")


def markdown(rows: list[dict]) -> str:
    lines = ["| intervention | hyperparameters | best plain CPU (s) | best intervened CPU (s) | CPU overhead | wall overhead |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['hyper']} | {r['cpu']['plain_s']:.3f} | {r['cpu']['intervened_s']:.3f} | "
                     f"{r['cpu']['overhead_pct']:+.1f}% | {r['wall']['overhead_pct']:+.1f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
