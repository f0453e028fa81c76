#!/usr/bin/env bash
# Session 4's H200 command for grouped dense attention (device tool: `bash benchmarks/h200_grouped.sh`,
# about 3 minutes): the GPU tests of kernels/grouped_dense.py, then benchmarks/h200_grouped.py (grouped
# dense beside dense SDPA, FlexAttention and the Triton local kernel). Results: benchmarks/results/h200_kernels_s4*.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv,noheader
if [ "${TESTS:-1}" = 1 ]; then
  timeout "${TEST_TIMEOUT:-60}" python3 -m pytest tests/kernels/test_grouped_dense.py -m gpu -q -p no:cacheprovider \
    --noconftest > "$OUT/h200_grouped_pytest.txt" 2>&1; tail -4 "$OUT/h200_grouped_pytest.txt"
fi
timeout "${BENCH_TIMEOUT:-125}" python3 benchmarks/h200_grouped.py > "$OUT/h200_grouped_log.txt" 2>&1
cat "$OUT/h200_grouped.md" 2>/dev/null || tail -40 "$OUT/h200_grouped_log.txt"
