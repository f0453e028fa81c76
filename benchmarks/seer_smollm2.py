"""SeerAttention gates on SmolLM2-135M (CPU calibration) and block-sparse prefill perplexity vs density.

Calibration: KJV Genesis (attnlab/data/kjv_genesis.txt) cut into ``--calib-len`` token segments.
Held-out: ``--n`` tokens from the KJV New Testament (kjv_text() from 80% of its characters on), disjoint.
For each k (blocks per query block) the table holds perplexity of SeerAttention top-k, oracle top-k
(the exact pooled map) and a sliding window of k blocks, all at the same density by construction,
plus SeerAttention at a few gate thresholds (their own density).

    python3 benchmarks/seer_smollm2.py --n 2048 --ks 2 3 4 8 --steps 300 --out benchmarks/results/seer_smollm2
"""
from __future__ import annotations

import argparse
import json
import math
import time
from importlib import resources

import torch

from attnlab.hf import load
from attnlab.hf.attach import attach
from attnlab.sparse.seer import calibration_data, make_gates, mean_kl, train_gates
from attnlab.sparse.seer_prefill import BlockSelect
from attnlab.tasks.haystack import kjv_text


def perplexity(model, ids: torch.Tensor, modifier=None) -> float:
    with torch.no_grad():
        if modifier is None:
            logits = model(input_ids=ids).logits
        else:
            with attach(model, modifiers=[modifier]):
                logits = model(input_ids=ids).logits
    nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    return math.exp(nll.item())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 3, 4, 8])
    ap.add_argument("--thresholds", type=float, nargs="*", default=[0.01, 0.05])
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=1024)
    ap.add_argument("--calib-segments", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/seer_smollm2")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load("smollm2", dtype=torch.float32)
    t0 = time.time()
    genesis_text = resources.files("attnlab.data").joinpath("kjv_genesis.txt").read_text()
    genesis = tok(genesis_text, return_tensors="pt").input_ids
    segs = [genesis[:, i * args.calib_len:(i + 1) * args.calib_len] for i in range(args.calib_segments)]
    segs = [s for s in segs if s.shape[1] == args.calib_len]
    data = [calibration_data(model, s, block=args.block) for s in segs]
    gates = make_gates(model, hidden=args.hidden)
    kl0 = mean_kl(gates, data)
    losses = train_gates(gates, data, steps=args.steps)
    kl1 = mean_kl(gates, data)
    t_train = time.time() - t0
    torch.save(gates.state_dict(), args.out + "_gates.pt")
    text = kjv_text()
    held = tok(text[int(0.8 * len(text)):int(0.8 * len(text)) + 8 * args.n], return_tensors="pt").input_ids[:, :args.n]
    assert held.shape[1] == args.n
    held_kl = mean_kl(gates, [calibration_data(model, held, block=args.block)])
    rows = [{"method": "dense", "k": None, "density": 1.0, "ppl": perplexity(model, held)}]
    print(rows[-1], flush=True)
    for k in args.ks:
        for method in ("seer_topk", "oracle_topk", "window"):
            mod = BlockSelect(method, block=args.block, k=k, gates=gates)
            rows.append({"method": method, "k": k, "ppl": perplexity(model, held, mod), "density": mod.mean_density()})
            print(rows[-1], flush=True)
    for th in args.thresholds:
        mod = BlockSelect("seer_threshold", block=args.block, threshold=th, gates=gates)
        rows.append({"method": "seer_threshold", "threshold": th, "ppl": perplexity(model, held, mod),
                     "density": mod.mean_density()})
        print(rows[-1], flush=True)
    result = {"n": args.n, "block": args.block, "calib_tokens": args.calib_len * len(segs), "steps": args.steps,
              "kl_calib_before": kl0, "kl_calib_after": kl1, "kl_heldout_after": held_kl,
              "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
              "train_s": t_train, "rows": rows}
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    dense = rows[0]["ppl"]
    lines = [f"# SeerAttention on SmolLM2-135M, held-out KJV (NT) perplexity at N={args.n}, block {args.block}",
             "", f"Gates: {len(segs)}x{args.calib_len} Genesis tokens, {args.steps} Adam steps; "
             f"mean KL {kl0:.3f} -> {kl1:.3f} (calibration), {held_kl:.3f} (held-out).", "",
             "| method | k | threshold | density | sparsity | ppl | vs dense |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r.get('k') or ''} | {r.get('threshold') or ''} | {r['density']:.3f} | "
                     f"{1 - r['density']:.3f} | {r['ppl']:.3f} | {100 * (r['ppl'] / dense - 1):+.1f}% |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
