"""Prefill and decode tokens/s of every KV policy vs a plain transformers cache, SmolLM2 on CPU or CUDA.

    OMP_NUM_THREADS=2 python benchmarks/kv_speed.py --length 4096 --new 32 --budget 0.3 --repeats 2
    python benchmarks/kv_speed.py --device cuda --batch 1 8 --repeats 3      # GPU: batch 1 and 8

Each policy runs ``kv.generate`` inline (prefill under the policy, compression, then decoding);
"plain" is ``model.generate`` with transformers' DynamicCache and SDPA. Decode tokens/s counts the
decode forwards only (timed by the session's forward hooks; plain: total minus the first forward).
Runs are interleaved (plain, full, streaming, ...) per repeat and the best repeat is kept, so a
busy machine hurts every row alike. On CUDA every forward is bracketed by torch.cuda.synchronize.
A batch of B repeats the same prompt B times (no padding); decode tokens/s then counts all B rows.
Writes benchmarks/results/kv_speed.{json,md}.
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


def _stamp(times, device):
    def hook(*_):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter())

    return hook


def plain_run(model, ids, new):
    times = []
    pre = model.register_forward_pre_hook(_stamp(times, ids.device))
    post = model.register_forward_hook(_stamp(times, ids.device))
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
            model.generate(ids, attention_mask=torch.ones_like(ids), **kv.cache_kwargs(model, cache), max_new_tokens=new,
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
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    ap.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (the prompt repeated)")
    ap.add_argument("--policies", nargs="+", default=["plain", "full", "streaming", "snapkv", "h2o", "razor"],
                    help="plain (DynamicCache) and names in attnlab.kv.POLICIES")
    args = ap.parse_args()
    from attnlab.eval import resolve_device

    device = resolve_device(args.device)
    model, tok = load("smollm2")
    model.to(device)
    one = torch.tensor([make_needle(tok, length=args.length, n_samples=1, seed=0)[0].input_ids], device=device)
    model_head_scores(model)  # razor's head scores: computed (or read from disk) outside the timing
    policies = {name: (kv.Full() if name == "full" else kv.make_policy(name, budget=args.budget))
                for name in args.policies if name != "plain"}
    for policy in policies.values():
        policy.prepare(model)  # profiling / calibration outside the timing
    rows = {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".json")
    for batch in args.batch:
        ids = one.expand(batch, -1).contiguous()
        for rep in range(args.repeats):
            for name in args.policies:
                r = plain_run(model, ids, args.new) if name == "plain" else policy_run(model, ids, args.new, policies[name])
                prefill_s, decode_s, n_dec, kept = r
                row = dict(policy=name, batch=batch, prefill_s=prefill_s, prefill_tok_s=ids.numel() / prefill_s,
                           decode_s=decode_s, decode_tokens=n_dec * batch, decode_tok_s=n_dec * batch / decode_s,
                           kept_fraction=kept)
                print(f"batch {batch} repeat {rep} {name:9s} prefill {row['prefill_tok_s']:7.0f} tok/s  "
                      f"decode {row['decode_tok_s']:6.2f} tok/s  kept {kept:.3f}", flush=True)
                best = rows.get((name, batch))
                if best is None or row["decode_tok_s"] > best["decode_tok_s"]:
                    rows[(name, batch)] = row
                # rows so far, in case the run is stopped (a time budget)
                partial.write_text(json.dumps(dict(meta=dict(partial=True), rows=list(rows.values())), indent=1))
    load_avg = os.getloadavg()
    meta = dict(command="python " + " ".join(sys.argv), length=one.shape[1], new_tokens=args.new, budget=args.budget,
                repeats=args.repeats, torch=torch.__version__, threads=torch.get_num_threads(),
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                machine=platform.processor() or platform.machine(), load_average_at_end=load_avg)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=list(rows.values())), indent=1))
    lines = [f"# KV policies: prefill and decode speed, SmolLM2-135M, {one.shape[1]} prompt tokens, {meta['device']}", "",
             f"Command: `{meta['command']}` (torch {torch.__version__}, {meta['threads']} threads, "
             f"load average at the end {load_avg[0]:.1f}). Best of {args.repeats} interleaved repeats; "
             f"{args.new} new tokens (the first comes from the prefill).", "",
             "| policy | batch | budget | kept KV | prefill tok/s | decode tok/s | decode vs full | decode vs plain |",
             "|---|---|---|---|---|---|---|---|"]
    for (name, batch), r in rows.items():
        budget = "-" if name in ("plain", "full") else f"{args.budget:g}"
        full = rows.get(("full", batch), r)["decode_tok_s"]
        plain = rows.get(("plain", batch), r)["decode_tok_s"]
        lines.append(f"| {name} | {batch} | {budget} | {r['kept_fraction']:.3f} | {r['prefill_tok_s']:.0f} | "
                     f"{r['decode_tok_s']:.2f} | {r['decode_tok_s'] / full:.2f}x | {r['decode_tok_s'] / plain:.2f}x |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
