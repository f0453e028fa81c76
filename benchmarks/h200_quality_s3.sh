#!/usr/bin/env bash
# MQAR at issue 6's target size (N=256, softmax d_model 64, 2 layers) for every registered mechanism at equal
# parameters, plus ListOps / algorithmic / Scan&Snap, on the H200 beside the other jobs (6 training processes).
# Usage: bash benchmarks/h200_quality_s3.sh OUTDIR   (budget: 7 minutes wall; writes OUTDIR/quality.json)
set -u
mkdir -p "$1"
timeout 420 python3 -m attnlab.cli bench quality --device cuda --jobs 6 --max-minutes 5.5 \
  --lengths 256 --widths 64 --steps 1500 --extra listops algorithmic scan_snap --extra-steps 1500 \
  --no-progress --out "$1" || echo "FAILED quality rc=$?"
