#!/usr/bin/env bash
# Session 2's H200 command for issues 6-7 (device tool: `bash benchmarks/h200_zoo.sh`, about 9 minutes):
# CAB efficiency length of the sub-quadratic mechanisms (noncausal and causal), Lightning at 1K-64K, and the
# MQAR quality sweep with a 4.5-minute budget (rows not run are listed in quality.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,power.draw --format=csv > "$OUT/nvidia_smi.csv" 2>&1
MECHS="softmax lightning flowformer inline sigmoid kinetics"
for mode in "" "--causal"; do
  tag=$([ -n "$mode" ] && echo causal || echo noncausal); mkdir -p "$OUT/efficiency_$tag"
  timeout 85 python3 -m attnlab.cli bench efficiency --device cuda --dtype bfloat16 --mechanisms $MECHS \
    --lengths 1024 4096 16384 65536 $mode --repeats 3 --max-call-s 1.0 --no-progress --out "$OUT/efficiency_$tag" \
    > "$OUT/efficiency_$tag/log.txt" 2>&1
  echo "== efficiency $tag: exit $?"; head -30 "$OUT/efficiency_$tag/log.txt"
done
timeout 80 python3 benchmarks/linear_mechanisms.py --device cuda --dtype bfloat16 --batch 4 --heads 32 --dim 128 \
  --block 256 --lengths 1024 4096 16384 65536 --only lightning softmax --out "$OUT/h200_linear_mechanisms" \
  > "$OUT/h200_linear_log.txt" 2>&1; echo "== linear: exit $?"; tail -20 "$OUT/h200_linear_log.txt"
timeout 300 python3 -m attnlab.cli bench quality --device cuda --jobs 4 --max-minutes 4.5 \
  --lengths 64 128 256 --widths 32 64 --steps 1500 --no-progress --out "$OUT/quality" > "$OUT/quality_log.txt" 2>&1
echo "== quality: exit $?"; tail -40 "$OUT/quality_log.txt"
