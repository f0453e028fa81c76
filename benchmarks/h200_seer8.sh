#!/usr/bin/env bash
# WALL-CLOCK BUDGET: 270 s HARD (model load included). python under `timeout -k 5 245` (no row starts after
# SEER_DEADLINE=230 s), then the table under `timeout 12`. Writes 2 files: OUTDIR/seer8.json and OUTDIR/seer8.md.
#
# Session 7, issue 7: SeerAttention on SmolLM2-135M at 8K with 8-token blocks (1024 blocks per row), density
# 0.1, held-out KJV NT perplexity. Finer blocks helped the oracle most so far (CPU, 2K, density 0.12: +9.3% at
# 16-token blocks, +15.6% at 32, +53% at 64; benchmarks/results/seer_oracle_blocks_cpu.md), and 16-token blocks
# are the best measured at 8K (oracle +3.0%, gates +5.7%). Rows: the oracle (uniform and per-head k) and the
# session-5 gate recipe (base) plus query maxima/minima (q3), with the first block and 4 recent blocks forced
# (the same 32 recent tokens as +local2 at 16-token blocks). Same flow as benchmarks/h200_seer6.sh.
# Session 7 on the H200 (benchmarks/results/seer8_h200.md, SEER_DENSITIES=0.099 -> k = 52, density 0.0989):
# gates +3.39% (per-head k) / +3.64% (uniform k), oracle +0.95% / +2.06%: within 5% at 90.1% block sparsity;
# the selections touch 0.34 of the 64 x 64 kernel tiles.
#   bash benchmarks/h200_seer8.sh OUTDIR
#   SEER_DEVICE=cpu SEER_N=256 SEER_CALIB=4 SEER_VAL=2 SEER_ALLOC=2 SEER_DENSITIES=0.4 SEER_HIDDEN=64 \
#     SEER_VARIANTS="base:segs=2,steps=30 q3:segs=2,steps=30,qstats=3" SEER_TIMEOUT=900 SEER_DEADLINE=880 \
#     bash benchmarks/h200_seer8.sh /tmp/s8   # CPU check (timeouts are for the H200)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: $0 OUTDIR}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
F=sink+local4
VARIANTS="${SEER_VARIANTS:-base:segs=31,steps=3000 q3:segs=31,steps=3000,qstats=3}"
METHODS="oracle_topk oracle_headk+mass+$F"
for v in $VARIANTS; do
  name="${v%%:*}"
  METHODS="$METHODS seer_headk+$F+tmax+v$name"
  [ "$name" = base ] && METHODS="$METHODS seer_topk+$F+tmax+v$name"
done
J="$OUT/seer8.json"
echo "== seer8 (8-token blocks) on ${SEER_DEVICE:-cuda}: $(date -u +%T)"
timeout -k 5 "${SEER_TIMEOUT:-245}" python3 benchmarks/seer_smollm2.py --device "${SEER_DEVICE:-cuda}" \
  --lengths "${SEER_N:-8192}" --block 8 --calib-segments "${SEER_CALIB:-33}" --val-index "${SEER_VAL:-31}" \
  --alloc-segments "${SEER_ALLOC:-31}" --held-segments 2 --steps 3000 --lr 3e-3 --hidden "${SEER_HIDDEN:-256}" \
  --calib-chunk 1024 --densities ${SEER_DENSITIES:-0.1} --methods $METHODS --gate-variants $VARIANTS \
  --deadline-s "${SEER_DEADLINE:-230}" --calib-deadline-s "${SEER_CALIB_DEADLINE:-60}" --row-s 4 --val-ppl \
  --out "$J" || echo "FAILED or timed out: seer_smollm2.py (exit $?; partial JSON kept)"
echo "== table: $(date -u +%T)"
timeout 12 python3 benchmarks/sparse_frontier.py --seer "$J" --md "${J%.json}.md" > /dev/null \
  || echo "FAILED: sparse_frontier.py (exit $?)"
echo "== done: $(date -u +%T)"
