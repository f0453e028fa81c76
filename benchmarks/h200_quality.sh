#!/usr/bin/env bash
# Optional: the MQAR quality sweep at a size the CPU cannot afford (Zoology's lengths 64-256 and widths
# 32-128, 1,500 steps per run with early stop at 99%, plus ICL regression / algorithmic / ListOps /
# Scan&Snap with 2,000 steps), every registered mechanism, on one H200 with 4 training processes.
# One command for the device tool: `bash benchmarks/h200_quality.sh` (stops starting runs after 7 minutes;
# results in $OUT: quality.json/.md/.png). Copy them to benchmarks/results/quality_h200.* afterwards.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
timeout 560 python3 -m attnlab.cli bench quality --device cuda --jobs 4 --max-minutes 7 \
  --lengths 64 128 256 --widths 32 64 128 --steps 1500 \
  --extra icl algorithmic listops scan_snap --extra-steps 2000 --no-progress --out "$OUT" > "$OUT/quality_log.txt" 2>&1
echo "exit $?"; tail -60 "$OUT/quality_log.txt"
