#!/usr/bin/env bash
# WALL-CLOCK BUDGET: 270 s HARD (model load included). python under `timeout -k 5 245` (no row starts after
# SEER_DEADLINE=230 s), then the table under `timeout 12`. Writes 2 files: OUTDIR/seer8.json and OUTDIR/seer8.md.
#
# Session 7, issue 7: SeerAttention on SmolLM2-135M at 8K with 8-token blocks (1024 blocks per row), density
# 0.1, held-out KJV NT perplexity. Finer blocks helped the oracle most so far (CPU, 2K, density 0.12: +9.3% at
# 16-token blocks, +15.6% at 32, +53% at 64; benchmarks/results/seer_oracle_blocks_cpu.md), and 16-token blocks
# are the best measured at 8K (oracle +3.0%, gates +5.7%). Rows: the oracle (uniform and per-head k) and the
# session-5 gate recipe (base) plus query maxima/minima (q3), with the first block and 4 recent blocks forced
# (the same 32 recent tokens as +local2 at 16-token blocks): benchmarks/h200_seer6.sh with its block and forcing knobs.
# Session 7 on the H200 (benchmarks/results/seer8_h200.md, SEER_DENSITIES=0.099 -> k = 52, density 0.0989):
# gates +3.39% (per-head k) / +3.64% (uniform k), oracle +0.95% / +2.06%: within 5% at 90.1% block sparsity;
# the selections touch 0.34 of the 64 x 64 kernel tiles.
#   bash benchmarks/h200_seer8.sh OUTDIR
#   SEER_DEVICE=cpu SEER_N=256 SEER_CALIB=4 SEER_VAL=2 SEER_ALLOC=2 SEER_DENSITIES=0.4 SEER_HIDDEN=64 \
#     SEER_VARIANTS="base:segs=2,steps=30 q3:segs=2,steps=30,qstats=3" SEER_TIMEOUT=900 SEER_DEADLINE=880 \
#     bash benchmarks/h200_seer8.sh /tmp/s8   # CPU check (timeouts are for the H200)
set -uo pipefail
cd "$(dirname "$0")/.."
SEER_NAME=seer8 SEER_BLOCK=8 SEER_FORCED=sink+local4 SEER_CALIB="${SEER_CALIB:-33}" \
  SEER_VARIANTS="${SEER_VARIANTS:-base:segs=31,steps=3000 q3:segs=31,steps=3000,qstats=3}" \
  SEER_CALIB_DEADLINE="${SEER_CALIB_DEADLINE:-60}" exec bash benchmarks/h200_seer6.sh "$@"
