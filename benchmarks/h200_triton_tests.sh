#!/usr/bin/env bash
# GPU tests of tests/kernels (Triton local and block-sparse kernels, FlexAttention, grouped dense, the dense-core
# split) and of SeerAttention's blocks, within a hard wall-clock budget (default 150 s).
#
#   bash benchmarks/h200_triton_tests.sh OUTDIR      (device tool: bash benchmarks/h200_triton_tests.sh "$OUT")
#
# Writes OUTDIR/triton_tests.txt: a header (GPU, Triton), one summary line per part, then each part's pytest
# output. Most of the time goes to compiling kernels (one per new shape, single-threaded), so the tests run as
# eleven pytest processes side by side on the one GPU, each under `timeout`; a part that runs out of time is marked
# TIMEOUT (incomplete), not failed. Exit status: 0 if every part passed, 1 if a test failed or a part errored,
# 124 if none failed but one timed out. Knobs: BUDGET (seconds, default 150), EXAMPLES (hypothesis examples of
# the block-sparse random test, default 10; the local kernel's random tests fix 25 in the test file).
set -uo pipefail
OUTDIR="${1:?usage: h200_triton_tests.sh OUTDIR}"
cd "$(dirname "$0")/.."
mkdir -p "$OUTDIR"
BUDGET="${BUDGET:-150}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" ATTNLAB_GPU_EXAMPLES="${EXAMPLES:-10}"
REPORT="$OUTDIR/triton_tests.txt"
PARTS="$(mktemp -d)"
trap 'rm -rf "$PARTS"' EXIT

LOCAL=tests/kernels/test_triton_local.py
SPARSE=tests/kernels/test_triton_block_sparse.py
# name|file|-k expression: every gpu test of both files lands in exactly one part.
PART_LIST=(
  "local_reference_a|$LOCAL|matches_reference and dtype0"
  "local_reference_b|$LOCAL|matches_reference and not dtype0"
  "local_random_2d|$LOCAL|random_2d"
  "local_random_windows|$LOCAL|random_windows"
  "local_other|$LOCAL|not matches_reference and not random"
  "sparse_random|$SPARSE|random_layouts"
  "sparse_other|$SPARSE|not random_layouts"
  "flex|tests/kernels/test_flex.py|not zzz"
  "grouped_dense|tests/kernels/test_grouped_dense.py|not zzz"
  "dense_core|tests/kernels/test_dense_core.py|not zzz"
  "seer_blocks|tests/sparse|not zzz"  # SeerAttention's 16/32-token blocks through the block-sparse kernel
)
# (the other files of tests/kernels have no gpu-marked test)

{
  echo "# h200_triton_tests.sh: $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), budget ${BUDGET}s"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | head -1
  timeout 20 python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tail -1
} > "$REPORT"

# Leave ~8 s for start-up and the report; -k 3: a part that ignores SIGTERM is killed 3 s later.
LIMIT=$(( BUDGET - SECONDS - 8 - 3 ))
if (( LIMIT < 10 )); then echo "budget ${BUDGET}s too small" >> "$REPORT"; cat "$REPORT"; exit 1; fi
declare -A PIDS
for part in "${PART_LIST[@]}"; do
  IFS='|' read -r name file expr <<< "$part"
  timeout -k 3 "$LIMIT" python3 -m pytest "$file" -m gpu -k "$expr" -q -p no:cacheprovider --noconftest \
    > "$PARTS/$name.txt" 2>&1 &
  PIDS[$name]=$!
done

status=0
summary=""
for part in "${PART_LIST[@]}"; do
  name="${part%%|*}"
  wait "${PIDS[$name]}"; rc=$?
  last="$(grep -E '(passed|failed|error|skipped|deselected|no tests ran)' "$PARTS/$name.txt" | tail -1)"
  if [[ $rc == 124 || $rc == 137 ]] && [[ "$last" =~ \ in\ [0-9.]+s ]]; then  # summary printed: killed on exit
    if [[ "$last" =~ (failed|error) ]]; then rc=1; else rc=0; last+=" (finished, then killed at exit)"; fi
  fi
  case $rc in
    0) verdict=ok ;;
    124|137) verdict="TIMEOUT (incomplete after ${LIMIT}s)"; (( status == 0 )) && status=124 ;;
    5) verdict="no tests collected"; status=1 ;;
    *) verdict="FAILED rc=$rc"; status=1 ;;
  esac
  summary+="$(printf '%-22s %s: %s' "$name" "$verdict" "${last:-(no summary line)}")"$'\n'
done
{
  echo "# parts (wall ${SECONDS}s):"
  printf '%s' "$summary"
  for part in "${PART_LIST[@]}"; do
    name="${part%%|*}"
    echo; echo "===== $name ====="
    cat "$PARTS/$name.txt"
  done
} >> "$REPORT"
head -12 "$REPORT"
exit $status
