"""Overhead of attnlab.attach with nothing attached vs plain SDPA: one SmolLM2 forward at 1K and 4K tokens.

Run: python3 benchmarks/results/attach_overhead.py [--lengths 1024 4096] [--reps 5] [--threads N]
Writes benchmarks/results/attach_overhead.json and prints a markdown table.
Plain and attached forwards alternate, so a busy machine slows both alike; the median is reported.
Both wall time and this process's CPU time (time.process_time) are recorded: with --threads 1 on a
shared machine, CPU time is the fairer measure, as waiting for a core does not count.
A no-op observer (the exact chunked path) is timed once per length for scale.
Also timed: the dispatch cost alone, attnlab's attention function vs transformers' sdpa function on
one decode-sized call (1 query), which bounds the per-layer overhead independently of machine noise.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from attnlab.hf import attach, load
from attnlab.probes.base import Observer


class NoOp(Observer):
    def observe(self, ctx, q_start, probs):
        pass


def _forward_seconds(model, ids) -> tuple[float, float]:
    """(wall, cpu) seconds of one forward pass."""
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    return time.perf_counter() - wall, time.process_time() - cpu


def dispatch_seconds(model, calls: int = 3000, reps: int = 15) -> tuple[float, float]:
    """Median CPU seconds per call of (transformers' sdpa function, attnlab's function, nothing attached).

    The two alternate in ``reps`` rounds of ``calls`` calls each, so drifts hit both alike.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from attnlab.hf.attach import attention_layers, attnlab_attention

    module = attention_layers(model)[0]
    cfg = model.config
    q = torch.randn(1, cfg.num_attention_heads, 1, cfg.head_dim)
    k = v = torch.randn(1, cfg.num_key_value_heads, 64, cfg.head_dim)
    times: tuple[list, list] = ([], [])
    with attach(model):
        for _ in range(reps):
            for fn, out in zip((sdpa_attention_forward, attnlab_attention), times):
                start = time.process_time()
                for _ in range(calls):
                    fn(module, q, k, v, None, scaling=0.125)
                out.append((time.process_time() - start) / calls)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 4096])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load()
    sdpa_call, attnlab_call = dispatch_seconds(model)
    print(f"one attention call (1 query, 64 keys): sdpa {1e6 * sdpa_call:.1f} us, attnlab {1e6 * attnlab_call:.1f} us "
          f"(+{1e6 * (attnlab_call - sdpa_call):.2f} us per layer)", flush=True)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for n in args.lengths:
        ids = torch.randint(100, model.config.vocab_size, (1, n), generator=generator)
        _forward_seconds(model, ids)  # warm-up
        plain, attached = [], []
        for _ in range(args.reps):
            plain.append(_forward_seconds(model, ids))
            with attach(model):
                attached.append(_forward_seconds(model, ids))
        with attach(model, [NoOp()]):
            observed = _forward_seconds(model, ids)
        row = dict(tokens=n)
        for i, kind in enumerate(("wall", "cpu")):
            p = statistics.median(t[i] for t in plain)
            a = statistics.median(t[i] for t in attached)
            row[kind] = dict(plain_sdpa_s=p, attached_s=a, overhead_pct=100 * (a / p - 1),
                             noop_observer_s=observed[i], plain_all=[t[i] for t in plain],
                             attached_all=[t[i] for t in attached])
        rows.append(row)
        print(f"{n}: " + "; ".join(
            f"{k}: plain {row[k]['plain_sdpa_s']:.3f} s, attached {row[k]['attached_s']:.3f} s "
            f"({row[k]['overhead_pct']:+.1f}%), observer path {row[k]['noop_observer_s']:.3f} s" for k in ("wall", "cpu")
        ), flush=True)
    meta = dict(dispatch_us=dict(sdpa=1e6 * sdpa_call, attnlab=1e6 * attnlab_call), torch=torch.__version__, threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine(),
                reps=args.reps, dtype="float32", model="SmolLM2-135M-Instruct (dequantized Q4_1)")
    out = Path(__file__).parent / "results" / "attach_overhead.json"
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print("\n| tokens | clock | plain SDPA (s) | attached, nothing on (s) | overhead | no-op observer, exact path (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        for k in ("cpu", "wall"):
            x = r[k]
            print(f"| {r['tokens']} | {k} | {x['plain_sdpa_s']:.3f} | {x['attached_s']:.3f} | {x['overhead_pct']:+.1f}% "
                  f"| {x['noop_observer_s']:.3f} |")


if __name__ == "__main__":
    main()
