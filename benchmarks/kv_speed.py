"""Prefill and decode tokens/s of every KV policy vs a plain transformers cache, SmolLM2 on CPU or CUDA.

    OMP_NUM_THREADS=2 python benchmarks/kv_speed.py --length 4096 --new 32 --budget 0.3 --repeats 2
    python benchmarks/kv_speed.py --device cuda --batch 1 8 --repeats 3      # GPU: batch 1 and 8

Each policy runs ``kv.generate`` inline (prefill under the policy, compression, then decoding);
"plain" is ``model.generate`` with transformers' DynamicCache and SDPA. Decode tokens/s counts the
decode forwards only (timed by the session's forward hooks; plain: total minus the first forward).
Runs are interleaved (plain, full, streaming, ...) per repeat and the best repeat is kept, so a
busy machine hurts every row alike. On CUDA every forward is bracketed by torch.cuda.synchronize.
A second, per-step statistic resists single hiccups (a GC pause, a CPU stall) that can decide a
whole-run best-of: the median of every decode forward's time over all repeats ("median-step tok/s" =
batch / median step time); the garbage collector runs before each run, outside the timing. On the H200
whole repeats can run in a slow mode (session 5: per-repeat medians ~27 ms or ~42 ms per step at batch
8, for every policy alike), which the pooled median mixes in; the fastest repeat's median step
("best-repeat median") is robust to both a hiccup inside a run and a slow repeat (or a warm-up run).
A batch of B repeats the same prompt B times (no padding); decode tokens/s then counts all B rows.
Writes benchmarks/results/kv_speed.{json,md}.

``--packed auto|on|off``: layers whose KV heads keep different numbers of entries (moa, task_kv) are
packed for one variable-length attention call per step (``attnlab.kv.packed``): auto = on CUDA only
(the default of ``RaggedCache``), on = also on CPU (its exact segment loop), off = the group path.
The "packed" column counts the packed layers of the policy's last run. A policy name with the suffix
``@grouped`` (e.g. ``moa@grouped``) runs the same policy object on the group path (packing off), for an
A/B comparison inside one run.

``--ops`` also counts, per decode step, the aten ops dispatched by the model's forward (a
TorchDispatchMode, views excluded: they launch nothing) and the ops that would make a CUDA host wait
(``.item()``-like reads, ``nonzero``, a Python number written through an index). On a small model at
batch 1 the GPU is launch-bound, so ops per step (not bytes) predict decode speed there; counting
runs on the CPU too, where it is the GPU-independent proxy.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
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


def decode_ops(model, run):
    """Ops of the last decode forward of ``run()`` (a generate call; forward 0 is the prefill): an OpCounter."""
    from attnlab.kv.session import OpCounter

    state = {"i": 0, "mode": None, "last": None}

    def pre(*_):
        if state["i"] >= 1:
            state["mode"] = OpCounter()
            state["mode"].__enter__()

    def post(*_):
        if state["mode"] is not None:
            state["mode"].__exit__(None, None, None)
            state["last"], state["mode"] = state["mode"], None
        state["i"] += 1

    hooks = [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return state["last"]


def plain_generate(model, ids, new):
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0)


PACKED = {"auto": None, "on": True, "off": False}
GROUPED = "@grouped"  # policy-name suffix: the group path (packing off) for that row


def packing(name: str, packed: bool | None) -> bool | None:
    """The ``packed`` setting of a row: off for ``name@grouped``, else the run's ``--packed``."""
    return False if name.endswith(GROUPED) else packed


def policy_generate(model, ids, new, policy, packed: bool | None = None):
    with kv.apply(model, policy) as session:
        cache = session.new_cache(reserve=new + 1)
        cache.set_packed(packed)
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), **kv.cache_kwargs(model, cache), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0)
        return session, cache


def count_ops(model, ids, name, policy, new: int = 4, packed: bool | None = None) -> dict:
    """Ops per decode step (the last of ``new`` tokens: fixed-size caches are evicting by then)."""
    if name == "plain":
        def run():
            plain_generate(model, ids, new)
    else:
        def run():
            policy_generate(model, ids, new, policy, packed)
    c = decode_ops(model, run)
    return dict(ops=c.ops, views=c.views, syncs=c.syncs, by_op=dict(c.by_op.most_common()))


def plain_run(model, ids, new):
    times = []
    pre = model.register_forward_pre_hook(_stamp(times, ids.device))
    post = model.register_forward_hook(_stamp(times, ids.device))
    try:
        plain_generate(model, ids, new)
    finally:
        pre.remove()
        post.remove()
    spans = [b - a for a, b in zip(times[::2], times[1::2])]
    return spans[0], sum(spans[1:]), len(spans) - 1, 1.0, 0, spans[1:]


def policy_run(model, ids, new, policy, packed: bool | None = None):
    session, cache = policy_generate(model, ids, new, policy, packed)
    spans = [s for _, s in session.forwards]
    return spans[0], sum(spans[1:]), len(spans) - 1, cache.kept_fraction(), cache.packed_layers(), spans[1:]


def recording(model, one: torch.Tensor, batch: int):
    """One prefill of ``one`` (1, T) recorded with every score kind, its rows repeated ``batch`` times
    (the batch repeats the prompt, so the rows are equal): (recording, first tokens (batch,))."""
    from attnlab.kv.evaluate import record_prefill

    with kv.apply(model, None) as session:
        rec, logits, _ = record_prefill(model, one, frozenset({"window", "all"}), session)
    for layer in rec.layers:
        k, v = layer.pending
        layer.pending = (k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
        layer.scores = {kind: sc.expand(batch, -1, -1) for kind, sc in layer.scores.items()}
        layer.batch = batch
        layer.set_valid(None, batch, k.shape[2])
    return rec, logits.argmax(-1).expand(batch)


def decode_only_run(model, ids, first, rec, new, policy, packed: bool | None = None):
    """Decode ``new`` tokens from a recorded prefill compressed by ``policy`` (no prefill timed)."""
    from attnlab.kv.evaluate import decode

    with kv.apply(model, None):
        cache = rec.compressed(policy, reserve=new + 1, packed=packed)
        _, seconds, steps = decode(model, ids, first, cache, new, [], 0)
    return float("nan"), seconds, steps, cache.kept_fraction(), cache.packed_layers(), []


def make_policies(names, budget: float, quick_calibration: bool) -> dict:
    """Policies by name; ``quick_calibration``: MoA / Task-KV profile on one 512-token prompt per task
    (CPU smoke tests and op counts; the plans, hence the groups, can differ from the default profile)."""
    policies = {}
    for name in sorted(names, key=lambda n: GROUPED in n):  # plain names first: "x@grouped" reuses x's object
        if name == "plain":
            continue
        base = name.removesuffix(GROUPED)
        if base != name:
            policies[name] = policies.get(base) or make_policies([base], budget, quick_calibration)[base]
            continue
        kw = {} if name == "full" else dict(budget=budget)
        if quick_calibration and name == "moa":
            from attnlab.kv.moa import CALIBRATION_TASKS

            kw["calibration"] = (CALIBRATION_TASKS, (512,), 1)
        if quick_calibration and name == "task_kv":
            kw["calibration"] = (512, 1)
        policies[name] = kv.make_policy(name, **kw)
    return policies


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--budget", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats (0: op counts only, with --ops)")
    ap.add_argument("--out", default=str(RESULTS / "kv_speed"))
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    ap.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (the prompt repeated)")
    ap.add_argument("--policies", nargs="+", default=["plain", "full", "streaming", "snapkv", "h2o", "razor"],
                    help="plain (DynamicCache) and names in attnlab.kv.POLICIES")
    ap.add_argument("--ops", action="store_true", help="count aten ops and would-be syncs per decode step first")
    ap.add_argument("--decode-only", action="store_true",
                    help="CPU: record one prefill (batch 1, rows repeated) and time only decoding from it under each "
                         "policy (no plain row); prefill tok/s is then not measured")
    ap.add_argument("--packed", choices=sorted(PACKED), default="auto",
                    help="pack multi-group layers for one varlen call per step: auto = CUDA only (default), on, off")
    ap.add_argument("--quick-calibration", action="store_true",
                    help="MoA / Task-KV calibrate on one 512-token prompt per task (fast; plans may differ)")
    args = ap.parse_args()
    from attnlab.eval import resolve_device

    device = resolve_device(args.device)
    packed = PACKED[args.packed]
    model, tok = load("smollm2")
    model.to(device)
    one = torch.tensor([make_needle(tok, length=args.length, n_samples=1, seed=0)[0].input_ids], device=device)
    if "razor" in args.policies:
        model_head_scores(model)  # razor's head scores: computed (or read from disk) outside the timing
    policies = make_policies(args.policies, args.budget, args.quick_calibration)
    for policy in policies.values():
        policy.prepare(model)  # profiling / calibration outside the timing
    rows = {}
    step_times: dict[tuple, list[float]] = {}  # (policy, batch) -> every decode forward's seconds, all repeats
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(command="python " + " ".join(sys.argv), length=one.shape[1], new_tokens=args.new, budget=args.budget,
                repeats=args.repeats, torch=torch.__version__, threads=torch.get_num_threads(),
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                machine=platform.processor() or platform.machine(), quick_calibration=args.quick_calibration,
                decode_only=args.decode_only, packed=args.packed)
    # Timing first (every batch), op counts after: a run stopped by its time budget keeps the timings.
    for batch in args.batch:
        ids = one.expand(batch, -1).contiguous()
        if args.decode_only:
            rec, first = recording(model, one, batch)
        for rep in range(args.repeats):
            for name in args.policies:
                gc.collect()  # outside the timing: a collection inside a run would decide it
                if args.decode_only:
                    if name == "plain":
                        continue
                    r = decode_only_run(model, ids, first, rec, args.new, policies[name], packing(name, packed))
                elif name == "plain":
                    r = plain_run(model, ids, args.new)
                else:
                    r = policy_run(model, ids, args.new, policies[name], packing(name, packed))
                prefill_s, decode_s, n_dec, kept, n_packed, steps = r
                row = dict(policy=name, batch=batch, prefill_s=prefill_s, prefill_tok_s=ids.numel() / prefill_s,
                           decode_s=decode_s, decode_tokens=n_dec * batch, decode_tok_s=n_dec * batch / decode_s,
                           kept_fraction=kept, packed_layers=n_packed)
                pooled = step_times.setdefault((name, batch), [])
                pooled += steps
                median = statistics.median(steps) if steps else float("nan")
                print(f"batch {batch} repeat {rep} {name:9s} prefill {row['prefill_tok_s']:7.0f} tok/s  "
                      f"decode {row['decode_tok_s']:6.2f} tok/s (median step {median * 1e3:.2f} ms)  kept {kept:.3f}  "
                      f"packed layers {n_packed}", flush=True)
                best = rows.get((name, batch), {})
                if "decode_tok_s" not in best or row["decode_tok_s"] > best["decode_tok_s"]:
                    best = rows[(name, batch)] = {**best, **row}
                best.setdefault("repeat_median_step_ms", []).append(median * 1e3)
                if pooled:
                    best["best_repeat_median_step_ms"] = min(best["repeat_median_step_ms"])
                    best["median_step_ms"] = statistics.median(pooled) * 1e3
                    best["median_step_tok_s"] = batch / statistics.median(pooled)
                    best["steps_pooled"] = len(pooled)
                write(out, meta, rows, args, partial=True)
    if args.ops:
        for batch in args.batch:
            ids = one.expand(batch, -1).contiguous()
            for name in args.policies:
                c = count_ops(model, ids, name, policies.get(name), packed=packing(name, packed))
                rows.setdefault((name, batch), dict(policy=name, batch=batch)).update(
                    ops_per_step=c["ops"], syncs_per_step=c["syncs"], views_per_step=c["views"], ops_by_name=c["by_op"])
                print(f"batch {batch} {name:9s} {c['ops']} ops/step ({c['syncs']} syncs, {c['views']} views)", flush=True)
                write(out, meta, rows, args, partial=True)
    print(write(out, meta, rows, args, partial=False))
    return 0


def write(out: Path, meta: dict, rows: dict, args, partial: bool) -> str:
    """Write OUT.json and OUT.md (each replaced atomically, so a killed run leaves whole files); returns the table."""
    load_avg = os.getloadavg()
    meta = dict(meta, load_average=load_avg, partial=partial)
    _replace(out.with_suffix(".json"), json.dumps(dict(meta=meta, rows=list(rows.values())), indent=1))
    lines = [f"# KV policies: prefill and decode speed, SmolLM2-135M, {meta['length']} prompt tokens, {meta['device']}", "",
             f"Command: `{meta['command']}` (torch {meta['torch']}, {meta['threads']} threads, "
             f"load average {load_avg[0]:.1f}{', PARTIAL: the run was still going' if partial else ''}; "
             f"--packed {meta.get('packed', 'auto')}). "
             f"Best of {args.repeats} interleaved repeats; {args.new} new tokens (the first comes from the prefill). "
             "Ops/step: aten ops (views excluded) dispatched by one decode forward; syncs/step: ops that make a CUDA "
             "host wait. Packed: layers packed for one varlen attention call per step.", "",
             "Median-step tok/s: batch / the median time of every decode forward over all repeats (robust to "
             "single hiccups); best-repeat median: the fastest repeat's median step (robust to slow repeats too); "
             "decode tok/s: the best whole run.", "",
             "| policy | batch | budget | kept KV | packed | ops/step | syncs/step | prefill tok/s | decode tok/s "
             "| decode vs full | decode vs plain | median step ms | median-step tok/s | median-step vs full "
             "| best-repeat median ms | best-repeat median vs full |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def num(r, key, fmt):
        return format(r[key], fmt) if key in r else "-"

    for (name, batch), r in rows.items():
        budget = "-" if name in ("plain", "full") else f"{args.budget:g}"
        full = rows.get(("full", batch), {}).get("decode_tok_s")
        plain = rows.get(("plain", batch), {}).get("decode_tok_s")
        vs_full = f"{r['decode_tok_s'] / full:.2f}x" if full and "decode_tok_s" in r else "-"
        vs_plain = f"{r['decode_tok_s'] / plain:.2f}x" if plain and "decode_tok_s" in r else "-"
        full_median = rows.get(("full", batch), {}).get("median_step_tok_s")
        vs_full_median = (f"{r['median_step_tok_s'] / full_median:.2f}x"
                          if full_median and "median_step_tok_s" in r else "-")
        full_best = rows.get(("full", batch), {}).get("best_repeat_median_step_ms")
        vs_full_best_median = (f"{full_best / r['best_repeat_median_step_ms']:.2f}x"
                               if full_best and r.get("best_repeat_median_step_ms") else "-")
        lines.append(f"| {name} | {batch} | {budget} | {num(r, 'kept_fraction', '.3f')} | {num(r, 'packed_layers', 'd')} | "
                     f"{num(r, 'ops_per_step', 'd')} | "
                     f"{num(r, 'syncs_per_step', 'd')} | {num(r, 'prefill_tok_s', '.0f')} | {num(r, 'decode_tok_s', '.2f')} | "
                     f"{vs_full} | {vs_plain} | {num(r, 'median_step_ms', '.2f')} | {num(r, 'median_step_tok_s', '.2f')} | "
                     f"{vs_full_median} | {num(r, 'best_repeat_median_step_ms', '.2f')} | {vs_full_best_median} |")
    table = "\n".join(lines) + "\n"
    _replace(out.with_suffix(".md"), table)
    return table


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
