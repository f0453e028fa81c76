"""Oracle block selection with different query and key block sizes (SmolLM2-135M, held-out KJV NT, CPU).

Why: at 8K, 8-token blocks bring SeerAttention's gates within 5% of dense at 90% block sparsity (+3.4%,
benchmarks/results/seer8_h200.md), but an 8-row query block is far below a tensor-core tile, so a kernel
cannot skip most of the work (the selections touch 0.34 of the 64 x 64 tiles). A kernel that gathers key
blocks per query tile can use fine KEY blocks if the QUERY blocks are tile-sized (64 or 128 rows): this
script measures what such asymmetric blocks cost in quality, with the exact (oracle) attention mass.

Per layer and KV head, the oracle pools the exact probabilities into (query block, key block) cells (mass:
summed over the group's query heads and the key block, mean over the query block), keeps the first key
block and the key blocks that overlap the query block and its 32 preceding tokens, then the largest cells
until each query block row keeps ``density`` of its causal key blocks (at least the forced ones).

    python3 benchmarks/seer_asym_blocks.py --n 2048 --segments 2 --density 0.2 --out /tmp/asym.json
    python3 benchmarks/seer_asym_blocks.py --device cuda --n 8192 --density 0.1 --out /tmp/asym8k.json  # H200
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from attnlab.hf import load  # noqa: E402
from attnlab.interventions.base import Modifier  # noqa: E402
from attnlab.tasks.haystack import kjv_text  # noqa: E402
from seer_smollm2 import nll_sum, segments  # noqa: E402

LOCAL = 32  # tokens before each query block always kept (as +local2 at 16-token blocks)


def causal_cells(n: int, qb: int, kb: int, device=None) -> torch.Tensor:
    """(Nq/qb, Nk/kb) bool: key block j holds a key some query of block i may see (j * kb < (i + 1) * qb)."""
    i = torch.arange(n // qb, device=device)[:, None]
    j = torch.arange(n // kb, device=device)[None, :]
    return j * kb < (i + 1) * qb


def forced_cells(n: int, qb: int, kb: int, device=None) -> torch.Tensor:
    """(Nq/qb, Nk/kb) bool: the first key block, and key blocks overlapping [i * qb - LOCAL, (i + 1) * qb)."""
    i = torch.arange(n // qb, device=device)[:, None]
    j = torch.arange(n // kb, device=device)[None, :]
    near = ((j + 1) * kb > i * qb - LOCAL) & (j * kb < (i + 1) * qb)
    return near | (j == 0)


class AsymOracle(Modifier):
    """Oracle top-cells selection on (qb x kb) cells at a fixed per-row density; records the kept fraction
    of causal cells and of causal 64 x 64 tiles."""

    def __init__(self, qb: int, kb: int, density: float):
        self.qb, self.kb, self.density = qb, kb, density
        self.kept, self.tiles = [], []

    def score_bias(self, ctx):
        if ctx.n_q != ctx.n_kv:
            return None
        q, k = ctx.extra["query"].float(), ctx.extra["key"].float()
        b, hq, n, _ = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        s = (q @ k.repeat_interleave(g, 1).transpose(-1, -2)) * ctx.scaling
        dev = q.device
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=dev).tril(), float("-inf"))
        p = s.softmax(-1)  # (B, Hq, N, N)
        cells = p.view(b, hkv, g, n // self.qb, self.qb, n // self.kb, self.kb).sum((2, 6)).mean(3)  # (B, Hkv, Qb, Kb)
        causal = causal_cells(n, self.qb, self.kb, dev)
        forced = forced_cells(n, self.qb, self.kb, dev) & causal
        want = torch.maximum(torch.ceil(self.density * causal.sum(1)).long(), forced.sum(1))  # per query block
        score = cells.masked_fill(~causal, -1.0) + forced.float() * 10.0  # forced first, never non-causal
        rank = score.argsort(-1, descending=True).argsort(-1)
        keep = (rank < want[:, None]) & causal  # (B, Hkv, Qb, Kb)
        self.kept.append(keep.sum().item() / (causal.sum().item() * b * hkv))
        tok = keep.repeat_interleave(self.qb, 2).repeat_interleave(self.kb, 3)  # (B, Hkv, N, N)
        t64 = tok.view(b, hkv, n // 64, 64, n // 64, 64).any(5).any(3)
        c64 = causal_cells(n, 64, 64, dev)
        self.tiles.append((t64 & c64).sum().item() / (c64.sum().item() * b * hkv))
        bias = torch.zeros(b, hkv, n, n, device=dev).masked_fill_(~tok, -1e9)
        return bias.repeat_interleave(g, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--segments", type=int, default=2)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--shapes", nargs="+", default=["16x16", "8x8", "64x8", "64x16", "128x8", "64x64"])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (8K needs the GPU: an (N, N) map per layer)")
    ap.add_argument("--out", default="benchmarks/results/seer_asym_blocks_cpu.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load("smollm2", dtype=torch.float32)
    model.to(args.device)
    text = kjv_text()
    start = int(0.8 * len(text))
    held = [s.to(args.device) for s in segments(tok(text[start:start + args.segments * args.n * 8],
                                                    return_tensors="pt").input_ids, args.n, args.segments)]
    res = {"n": args.n, "segments": len(held), "density": args.density, "local": LOCAL, "rows": []}
    t0 = time.time()
    dense = sum(nll_sum(model, ids)[0] for ids in held)
    cnt = sum(ids.shape[1] - 1 for ids in held)
    res["dense_ppl"] = math.exp(dense / cnt)
    print(f"dense ppl {res['dense_ppl']:.3f} [{time.time() - t0:.0f} s]", flush=True)
    for shape in args.shapes:
        qb, kb = (int(x) for x in shape.split("x"))
        mods = [AsymOracle(qb, kb, args.density) for _ in held]
        tot = sum(nll_sum(model, ids, m)[0] for ids, m in zip(held, mods))
        kept = sum(sum(m.kept) / len(m.kept) for m in mods) / len(mods)
        tiles = sum(sum(m.tiles) / len(m.tiles) for m in mods) / len(mods)
        ppl = math.exp(tot / cnt)
        row = {"qb": qb, "kb": kb, "ppl": ppl, "vs_dense": ppl / res["dense_ppl"] - 1, "kept": kept, "tiles64": tiles}
        res["rows"].append(row)
        print(f"q{qb} x k{kb}: ppl {ppl:.3f} ({row['vs_dense']:+.2%}), kept {kept:.3f} of causal cells, "
              f"{tiles:.3f} of causal 64x64 tiles [{time.time() - t0:.0f} s]", flush=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
