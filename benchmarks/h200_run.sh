#!/usr/bin/env bash
# The one command sent to the H200 for issue 2's kernel targets (device tool: `bash benchmarks/h200_run.sh`).
# Writes under $OUT: h200_kernels.{json,md} (benchmarks/h200_local.py), its log, nvidia-smi state, and,
# when `attnlab bench kernels` exists, its JSON. Results are committed as benchmarks/results/h200_*.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu --format=csv \
  > "$OUT/h200_nvidia_smi.csv" 2>&1
FULL_CHECK="${FULL_CHECK:-0}" VARIANTS="${VARIANTS:-0:0:1,1:0:1}" timeout "${LOCAL_TIMEOUT:-250}" python3 benchmarks/h200_local.py 2>&1 | tee "$OUT/h200_log.txt"
# The kernel's GPU tests (float64 reference, hypothesis shapes, fp32/fp16/bf16) on the same machine.
# (FULL_CHECK=1 adds fp32/fp16 to the script's own checks; their IEEE-fp32 compiles take ~2 min.)
timeout "${TEST_TIMEOUT:-200}" python3 -m pytest tests/kernels/test_triton_local.py -m gpu -q -p no:cacheprovider --noconftest \
  2>&1 | tail -30 > "$OUT/h200_pytest.txt"
tail -3 "$OUT/h200_pytest.txt"
if [ "${RUN_BENCH_KERNELS:-1}" = 1 ] && python3 -c "import attnlab.bench.kernels" 2>/dev/null; then
  timeout "${BENCH_TIMEOUT:-90}" python3 -m attnlab.cli bench kernels --device cuda --json "$OUT/h200_bench_kernels.json" \
    2>&1 | tail -40 | tee "$OUT/h200_bench_kernels_log.txt"
fi
