#!/usr/bin/env bash
# Attention-layer drop (paper 49): prefill speed-up on the H200 with the GPU to itself (run it as an "alone" job of
# benchmarks/h200_smollm2_jobs.sh; h200_interventions.sh runs it last). HARD BUDGET 45 s (LD_TIMEOUT). Writes OUTDIR/layer_drop_speed.{json,md}.
#   bash benchmarks/h200_layer_drop_speed.sh OUTDIR      # env from benchmarks/device_smollm2.sh
set -uo pipefail
OUTDIR=${1:?usage: $0 OUTDIR}
mkdir -p "$OUTDIR"
cd "$(dirname "$0")/.."
timeout "${LD_TIMEOUT:-45}" python3 benchmarks/layer_drop.py --device "${DEVICE:-cuda}" --ks --sst2 0 --speed-ks 0 4 8 12 \
  --speed-reps "${LD_REPS:-30}" --speed-batch "${LD_SPEED_BATCH:-8}" --out "$OUTDIR/layer_drop_speed.json" 2>&1 \
  | sed -u "/Loading weights/d" || echo "FAILED layer_drop speed (exit $?)"
