#!/usr/bin/env bash
# WALL-CLOCK BUDGET: 5 minutes (each piece below is under `timeout`; the whole script ends within ~290 s).
#
# SeerAttention gates for SmolLM2-135M trained on the H200 at 8K, 4K and 2K tokens (KJV from Genesis on),
# then held-out KJV New Testament perplexity vs block density for seer top-k, seer threshold, oracle top-k,
# sliding window and sink + window blocks, at densities 0.5 down to 0.05 (issue 7, The Sparse Frontier);
# needle accuracy at 4K (10 samples) with sparse prefill and dense decoding.
# Assumes the env is set up (benchmarks/device_smollm2.sh env): python3 finds attnlab and smollm2, CUDA.
#
#   bash benchmarks/h200_seer_smollm2.sh OUTDIR        # writes OUTDIR/seer_smollm2.json + OUTDIR/seer_smollm2.md
#   SEER_DEVICE=cpu SEER_LENGTHS="256" SEER_STEPS=5 SEER_CALIB=2 bash benchmarks/h200_seer_smollm2.sh /tmp/x  # CPU check
#
# The JSON is rewritten after every row, so a timeout keeps what was measured. The figure is made on any
# machine afterwards: python3 benchmarks/sparse_frontier.py --seer OUTDIR/seer_smollm2.json --md ... --png ...
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: $0 OUTDIR}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
DEV="${SEER_DEVICE:-cuda}"
echo "== seer_smollm2 on $DEV: $(date -u +%T)"
# 8K first: it is the target length; 4K and 2K follow if time is left (each length has its own eval budget).
timeout 255 python3 benchmarks/seer_smollm2.py --device "$DEV" --lengths ${SEER_LENGTHS:-8192 4096 2048} \
  --calib-segments "${SEER_CALIB:-8}" --held-segments 2 --steps "${SEER_STEPS:-600}" --lr 3e-3 \
  --densities 0.5 0.3 0.2 0.1 0.05 --thresholds 0.001 0.003 0.01 0.03 --eval-budget-s 55 \
  --needle-length "${SEER_NEEDLE:-4096}" --needle-samples 10 --needle-densities 0.1 0.2 --needle-budget-s 45 \
  --out "$OUT/seer_smollm2.json" || echo "FAILED or timed out: seer_smollm2.py (exit $?; partial JSON kept)"
echo "== frontier table: $(date -u +%T)"
timeout 25 python3 benchmarks/sparse_frontier.py --seer "$OUT/seer_smollm2.json" --md "$OUT/seer_smollm2.md" \
  || echo "FAILED: sparse_frontier.py (exit $?)"
echo "== done: $(date -u +%T)"
