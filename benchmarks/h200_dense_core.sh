#!/usr/bin/env bash
# Session 6 (device tool, one H200; hard budget 270 s: 150 + 100 s of timeouts + start-up): the dense-core
# split of 1-D local attention (src/attnlab/kernels/dense_core.py) against the plain Triton kernel and SDPA,
# then its GPU tests and the 1-D tests of the local kernel (whose signature the split extended).
#   bash benchmarks/h200_dense_core.sh OUTDIR
# Writes OUTDIR/dense_core.md (the table and the test summaries) and OUTDIR/dense_core.json.
set -uo pipefail
FINAL="${1:-${OUT:-out}}"
mkdir -p "$FINAL"
FINAL="$(cd "$FINAL" && pwd)"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv,noheader
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "== 1. benchmarks/h200_dense_core.py"
OUT="$FINAL" timeout -k 3 "${CORE_TIMEOUT:-150}" python3 benchmarks/h200_dense_core.py 2>&1 | grep -v "^\s*$" | tail -40 \
  || echo "FAILED or timed out: h200_dense_core.py"
echo "== 2. GPU tests (parallel parts)"
T="$(mktemp -d)"
timeout -k 3 "${TEST_TIMEOUT:-100}" python3 -m pytest -m gpu tests/kernels/test_dense_core.py -q -p no:cacheprovider > "$T/core.txt" 2>&1 &
timeout -k 3 "${TEST_TIMEOUT:-100}" python3 -m pytest -m gpu tests/kernels/test_triton_local.py -q -p no:cacheprovider \
  -k "random_windows_cross or sliding_window or tile_options or dispatch" > "$T/local1d.txt" 2>&1 &
timeout -k 3 "${TEST_TIMEOUT:-100}" python3 -m pytest tests/kernels/test_attention.py -q -p no:cacheprovider > "$T/attention.txt" 2>&1 &
wait
{
  echo; echo "## pytest -m gpu (session 6)"; echo; echo '```'
  for f in core local1d attention; do echo "$f: $(tail -1 "$T/$f.txt")"; done
  grep -h -E "^(FAILED|ERROR)|Error" "$T"/*.txt | head -20
  echo '```'
} | tee -a "$FINAL/dense_core.md"
