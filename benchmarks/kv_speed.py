"""Prefill and decode tokens/s of every KV policy vs a plain transformers cache, SmolLM2 on CPU.

    OMP_NUM_THREADS=2 python benchmarks/kv_speed.py --length 4096 --new 32 --budget 0.3 --repeats 2

Each policy runs ``kv.generate`` inline (prefill under the policy, compression, then decoding);
"plain" is ``model.generate`` with transformers' DynamicCache and SDPA. Decode tokens/s counts the
decode forwards only (timed by the session's forward hooks; plain: total minus the first forward).
Runs are interleaved (plain, full, streaming, ...) per repeat and the best repeat is kept, so a
busy machine hurts every row alike. Writes benchmarks/results/kv_speed.{json,md}.
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

from attnlab import kv
from attnlab.hf import load
from attnlab.kv.razor import model_head_scores
from attnlab.tasks import make_needle

RESULTS = Path(__file__).parent / "results"


def plain_run(model, ids, new):
    times = []
    pre = model.register_forward_pre_hook(lambda *a: times.append(time.perf_counter()))
    post = model.register_forward_hook(lambda *a: times.append(time.perf_counter()))
    try:
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)
    finally:
        pre.remove()
        post.remove()
    spans = [b - a for a, b in zip(times[::2], times[1::2])]
    return spans[0], sum(spans[1:]), len(spans) - 1, 1.0


def policy_run(model, ids, new, policy):
    with kv.apply(model, policy) as session:
        cache = session.new_cache(reserve=new + 1)
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0)
        spans = [s for _, s in session.forwards]
    return spans[0], sum(spans[1:]), len(spans) - 1, cache.kept_fraction()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--budget", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "kv_speed"))
    args = ap.parse_args()
    model, tok = load("smollm2")
    ids = torch.tensor([make_needle(tok, length=args.length, n_samples=1, seed=0)[0].input_ids])
    model_head_scores(model)  # razor's head scores: computed (or read from disk) outside the timing
    rows = {}
    for rep in range(args.repeats):
        for name in ["plain", "full", "streaming", "snapkv", "h2o", "razor"]:
            if name == "plain":
                r = plain_run(model, ids, args.new)
            else:
                policy = kv.Full() if name == "full" else kv.make_policy(name, budget=args.budget)
                r = policy_run(model, ids, args.new, policy)
            prefill_s, decode_s, n_dec, kept = r
            row = dict(policy=name, prefill_s=prefill_s, prefill_tok_s=ids.shape[1] / prefill_s,
                       decode_s=decode_s, decode_tokens=n_dec, decode_tok_s=n_dec / decode_s, kept_fraction=kept)
            print(f"repeat {rep} {name:9s} prefill {row['prefill_tok_s']:7.0f} tok/s  "
                  f"decode {row['decode_tok_s']:6.2f} tok/s  kept {kept:.3f}", flush=True)
            best = rows.get(name)
            if best is None or row["decode_tok_s"] > best["decode_tok_s"]:
                rows[name] = row
    load_avg = os.getloadavg()
    meta = dict(command="python " + " ".join(sys.argv), length=ids.shape[1], new_tokens=args.new, budget=args.budget,
                repeats=args.repeats, torch=torch.__version__, threads=torch.get_num_threads(),
                machine=platform.processor() or platform.machine(), load_average_at_end=load_avg)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=list(rows.values())), indent=1))
    full = rows["full"]["decode_tok_s"]
    plain = rows["plain"]["decode_tok_s"]
    lines = [f"# KV policies: prefill and decode speed, SmolLM2-135M, {ids.shape[1]} prompt tokens, CPU", "",
             f"Command: `{meta['command']}` (torch {torch.__version__}, {meta['threads']} threads, "
             f"load average at the end {load_avg[0]:.1f}). Best of {args.repeats} interleaved repeats; "
             f"{args.new} new tokens (the first comes from the prefill).", "",
             "| policy | budget | kept KV | prefill tok/s | decode tok/s | decode vs full | decode vs plain |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        budget = "-" if name in ("plain", "full") else f"{args.budget:g}"
        lines.append(f"| {name} | {budget} | {r['kept_fraction']:.3f} | {r['prefill_tok_s']:.0f} | "
                     f"{r['decode_tok_s']:.2f} | {r['decode_tok_s'] / full:.2f}x | {r['decode_tok_s'] / plain:.2f}x |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
