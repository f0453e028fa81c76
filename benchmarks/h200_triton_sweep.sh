#!/usr/bin/env bash
# Session 5, round 1 (device tool, one H200, <= 300 s): sweep of launch/tile configs and kernel options of
# attnlab's Triton local and block-sparse kernels on issue 2's / issue 7's unmet targets
# (benchmarks/h200_triton_sweep.py: parallel compile + small-case checks, then CUDA-event timings).
#   bash benchmarks/h200_triton_sweep.sh OUTDIR
# Writes exactly two files: OUTDIR/triton_sweep.json and OUTDIR/triton_sweep.md; the log goes to stdout.
set -uo pipefail
OUTDIR="${1:-${OUT:-out}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
OUT="$OUTDIR" SWEEP_PLAN="${SWEEP_PLAN:-2}" timeout -k 5 "${SWEEP_TIMEOUT:-285}" python3 benchmarks/h200_triton_sweep.py
rc=$?
echo "sweep exit $rc"
ls -l "$OUTDIR"
