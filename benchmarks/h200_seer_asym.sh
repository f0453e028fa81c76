#!/usr/bin/env bash
# WALL-CLOCK BUDGET: 200 s HARD (model load included): python under `timeout -k 5 190`.
# Writes 1 file: OUTDIR/seer_asym_8k.json (rewritten after every row).
#
# Issue 7, next step after session 7: the oracle with different query and key block sizes at 8K (the CPU study at
# 2K, benchmarks/results/seer_asym_blocks_cpu.md, found coarse query blocks as costly as coarse key blocks). If a
# tile-friendly shape (16x8, 32x8, 64x8) keeps the 8x8 quality at 8K, a key-gathering kernel can run it.
#   bash benchmarks/h200_seer_asym.sh OUTDIR        # inside benchmarks/h200_smollm2_jobs.sh (SmolLM2 staged)
#   SEER_ASYM_DEVICE=cpu SEER_ASYM_N=512 SEER_ASYM_SEGS=1 bash benchmarks/h200_seer_asym.sh /tmp/sa   # CPU check
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: $0 OUTDIR}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
timeout -k 5 "${SEER_ASYM_TIMEOUT:-190}" python3 benchmarks/seer_asym_blocks.py --device "${SEER_ASYM_DEVICE:-cuda}" \
  --n "${SEER_ASYM_N:-8192}" --segments "${SEER_ASYM_SEGS:-2}" --density "${SEER_ASYM_DENSITY:-0.1}" \
  --shapes 8x8 16x8 8x16 16x16 32x8 64x8 64x64 --out "$OUT/seer_asym_8k.json" \
  || echo "FAILED or timed out: seer_asym_blocks.py (exit $?; partial JSON kept)"
