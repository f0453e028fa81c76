#!/usr/bin/env bash
# Session 2's H200 command (device tool: `bash benchmarks/h200_session2.sh`): the Triton kernel's GPU tests,
# the kernel on the issue-2 target cases (benchmarks/h200_local.py, no FlexAttention), and
# `attnlab bench kernels --device cuda`. Results: benchmarks/results/h200_bench_kernels*, h200_notes.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv > "$OUT/nvidia_smi.csv" 2>&1
timeout 140 python3 -m pytest tests/kernels/test_triton_local.py -m gpu -q -p no:cacheprovider --noconftest \
  -k "matches_reference or cross" 2>&1 | tail -15 > "$OUT/h200_pytest.txt"; tail -3 "$OUT/h200_pytest.txt"
FULL_CHECK=0 CHECK_TMA=0 FLEX=0 VARIANTS="${VARIANTS:-0:0:1}" CASES="${CASES:-0,1,3,4,5,2}" TAG=_s2 \
  timeout 220 python3 benchmarks/h200_local.py > "$OUT/h200_local_log.txt" 2>&1; tail -25 "$OUT/h200_local_log.txt"
timeout 200 python3 -m attnlab.cli bench kernels --device cuda --no-progress --json "$OUT/h200_bench_kernels.json" \
  > "$OUT/h200_bench_kernels_log.txt" 2>&1; tail -40 "$OUT/h200_bench_kernels_log.txt"
