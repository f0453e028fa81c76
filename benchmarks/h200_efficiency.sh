#!/usr/bin/env bash
# CAB efficiency length (paper 14) of every registered mechanism against softmax on one H200, bf16,
# d_model 512, 8 heads, B=4 (CAB's setting), N = 1K..64K, noncausal and causal (the causal run holds
# the Lightning target: flat time per token 1K-64K, faster than SDPA causal from <= 4K).
# One command for the device tool: `bash benchmarks/h200_efficiency.sh` (about 3-4 minutes; results in
# $OUT: efficiency_cuda*.json/.md/.png and logs). Copy them to benchmarks/results/ afterwards.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,power.draw --format=csv > "$OUT/nvidia_smi.csv" 2>&1
LENGTHS="1024 2048 4096 8192 16384 32768 65536"
for mode in "" "--causal"; do
  tag=$([ -n "$mode" ] && echo causal || echo noncausal)
  timeout 110 python3 -m attnlab.bench.efficiency --device cuda --dtype bfloat16 --lengths $LENGTHS $mode \
    --repeats 5 --max-call-s 1.5 --no-progress --out "$OUT" > "$OUT/efficiency_cuda_${tag}_log.txt" 2>&1
  echo "== $tag: exit $?"; head -24 "$OUT/efficiency_cuda_${tag}_log.txt"
done
