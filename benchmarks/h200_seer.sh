#!/usr/bin/env bash
# Block-sparse prefill attention on SeerAttention-style per-head causal block layouts (keep the diagonal
# block, ceil(density * (row + 1)) blocks per row) on one GPU: attnlab's Triton block-sparse kernel
# (benchmarks/h200_block_sparse.py: tile/warp/stage/TMA/pipelined variants, checked against SDPA with
# a dense mask) beside dense causal SDPA and FlexAttention with a BlockMask from the same layouts.
# B=1, H=16, D=128, bf16, N=32768, block 128. Session 3 (device tool):
#   OUT=/tmp/out SEER_DENSITIES="0.10 0.20" bash benchmarks/h200_seer.sh
# Set FLEX_ONLY=1 for session 2's FlexAttention-only run (the python below, < 4 minutes).
set -euo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if [ "${FLEX_ONLY:-0}" != "1" ]; then
  cd "$(dirname "$0")/.."
  OUT="$OUT" SEER_DENSITIES="${SEER_DENSITIES:-0.10 0.20}" PYTHONUNBUFFERED=1 python3 benchmarks/h200_block_sparse.py
  exit
fi
SRC="$(cd "$(dirname "$0")/.." && pwd)/src"
SEER_DENSITIES=${SEER_DENSITIES:-"0.10 0.05 0.20 0.30"} OUT="$OUT" PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}" python3 - <<'EOF'
import json, os, time
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from attnlab.core.patterns.block_sparse import random_causal_layout

B, H, N, D, BS = 1, 16, 32768, 128, 128
dev = "cuda"
flex = torch.compile(flex_attention, dynamic=False)
torch.manual_seed(0)
q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
nb = N // BS
causal_blocks = nb * (nb + 1) // 2


def timeit(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    for _ in range(reps):
        fn()
    ev[1].record()
    torch.cuda.synchronize()
    return ev[0].elapsed_time(ev[1]) / reps


def layout(density):
    """(H, nb, nb) bool: diagonal + random causal blocks, the same count per head, `density` of causal blocks
    (per row ceil(density * (row+1)) blocks: density holds in every row, like a threshold gate)."""
    return random_causal_layout(nb, density, H, device=dev)


def block_mask_from_layout(lay):
    """BlockMask straight from the (H, nb, nb) layout: diagonal blocks partial (causal mask_mod), the rest
    full. (create_block_mask would evaluate the mask at every (h, q, k): 128 GiB at N=32K, H=16.)"""
    i = torch.arange(nb, device=dev)
    diag = torch.zeros_like(lay)
    diag[:, i, i] = True

    def pack(sel):
        cnt = sel.sum(-1).to(torch.int32)
        idx = sel.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)  # selected first
        return cnt[None].contiguous(), idx[None].contiguous()

    kn, ki = pack(lay & diag)
    fn_, fi = pack(lay & ~diag)
    return BlockMask.from_kv_blocks(kn, ki, fn_, fi, BLOCK_SIZE=BS, mask_mod=lambda b, h, qi, kj: qi >= kj)


dense_sdpa = timeit(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
causal_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, N, N, device=dev, BLOCK_SIZE=BS)
flex_causal = timeit(lambda: flex(q, k, v, block_mask=causal_mask))
rows = []
for d in sorted({float(x) for x in os.environ["SEER_DENSITIES"].split()}):
    lay = layout(d)
    real = lay.sum().item() / (H * causal_blocks)
    bm = block_mask_from_layout(lay)
    t = timeit(lambda: flex(q, k, v, block_mask=bm))
    ideal = 1 / real
    rows.append({"density": real, "sparsity": 1 - real, "ms": t, "speedup_vs_sdpa": dense_sdpa / t,
                 "speedup_vs_flex_causal": flex_causal / t, "ideal": ideal,
                 "fraction_of_ideal_vs_sdpa": dense_sdpa / t / ideal})
    print(rows[-1], flush=True)
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "B": B, "H": H, "N": N, "D": D,
       "block": BS, "dense_sdpa_ms": dense_sdpa, "flex_causal_ms": flex_causal, "rows": rows}
json.dump(res, open(os.path.join(os.environ["OUT"], "seer_h200.json"), "w"), indent=1)
print(f"dense SDPA causal {dense_sdpa:.2f} ms, flex causal {flex_causal:.2f} ms")
print("| density | sparsity | ms | x SDPA | x flex causal | ideal | fraction of ideal |")
for r in rows:
    print(f"| {r['density']:.3f} | {r['sparsity']:.3f} | {r['ms']:.2f} | {r['speedup_vs_sdpa']:.2f} | "
          f"{r['speedup_vs_flex_causal']:.2f} | {r['ideal']:.1f} | {r['fraction_of_ideal_vs_sdpa']:.2f} |")
EOF
