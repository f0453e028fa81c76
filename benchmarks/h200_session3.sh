#!/usr/bin/env bash
# Session 3's H200 command (device tool: `bash benchmarks/h200_session3.sh`; at most 8.5 minutes, each step
# has its own limit): the Triton block-sparse kernel's GPU tests, the SeerAttention-layout benchmark (Triton
# variants beside causal SDPA and FlexAttention, benchmarks/h200_block_sparse.py), the local kernel on the
# issue-2 target cases (benchmarks/h200_local.py, FlexAttention in the same run), and
# `attnlab bench kernels --device cuda`. Skip steps with STEPS (default "tests seer local bench").
# Results: benchmarks/results/seer_h200_triton*, h200_kernels_s3*, h200_bench_kernels_s3*.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"; mkdir -p "$OUT"
STEPS="${STEPS:-tests seer local bench}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# At most 8 files come back from the device tool: the GPU state goes to stdout, the seer table is in its log.
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv,noheader
if [[ " $STEPS " == *" tests "* ]]; then
  ATTNLAB_GPU_EXAMPLES="${EXAMPLES:-6}" timeout "${TEST_TIMEOUT:-90}" python3 -m pytest tests/kernels/test_triton_block_sparse.py \
    -m gpu -q -p no:cacheprovider --noconftest > "$OUT/h200_pytest_block_sparse.txt" 2>&1; tail -4 "$OUT/h200_pytest_block_sparse.txt"
fi
if [[ " $STEPS " == *" seer "* ]]; then
  OUT="$OUT" FLEX=1 SEER_DENSITIES="${SEER_DENSITIES:-0.10 0.20}" timeout "${SEER_TIMEOUT:-120}" \
    python3 benchmarks/h200_block_sparse.py > "$OUT/seer_h200_triton_log.txt" 2>&1; tail -24 "$OUT/seer_h200_triton_log.txt"
  rm -f "$OUT/seer_h200_triton.md"
fi
if [[ " $STEPS " == *" local "* ]]; then
  FULL_CHECK=0 CHECK_TMA=0 FLEX=1 VARIANTS="${VARIANTS_LOCAL:-0:0:1}" CASES="${CASES:-0,1,3,4,5}" TAG=_s3 \
    timeout "${LOCAL_TIMEOUT:-150}" python3 benchmarks/h200_local.py > "$OUT/h200_local_s3_log.txt" 2>&1
  tail -20 "$OUT/h200_local_s3_log.txt"
fi
if [[ " $STEPS " == *" bench "* ]]; then
  timeout "${BENCH_TIMEOUT:-150}" python3 -m attnlab.cli bench kernels --device cuda --no-progress \
    --json "$OUT/h200_bench_kernels_s3.json" > "$OUT/h200_bench_kernels_s3_log.txt" 2>&1; tail -30 "$OUT/h200_bench_kernels_s3_log.txt"
fi
