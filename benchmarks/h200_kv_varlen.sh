#!/usr/bin/env bash
# Issue 4, "decode tokens/s with any compressed policy >= full": multi-group KV layers packed for ONE varlen
# attention call per decode step (attnlab.kv.packed; on CUDA by default). Run it ALONE on the GPU.
# HARD WALL-CLOCK BUDGET: 240 s, every piece under `timeout`:
#   tests  30 s  pytest -m gpu tests/kv: varlen kernels (fp32 efficient-attention cu_seqlens, bf16/fp16 flash)
#                vs float64 with gap segments, a packed layer over decode steps vs float64, SmolLM2 on CUDA
#                packed with no more syncs than full and fewer ops/step (round 1: 12.6 s)
#   speed 200 s  benchmarks/kv_speed.py --device cuda: 4,096 prompt tokens, 64 new tokens, batch 8 (round 2; batch 1
#                was >= full for all but h2o in round 1), full, snapkv (unchanged control), h2o, moa and task_kv
#                packed, moa@grouped and task_kv@grouped (the same policies on the group path: A/B in one run),
#                budget 0.3, 6 interleaved repeats; both the best whole run and the median of every decode step's
#                synchronized time over all repeats (robust to one hiccup); then ops and syncs per step (--ops)
# Writes 2 files into OUTDIR: kv_speed.json and kv_speed.md (rewritten after every row: a timeout keeps the
# finished rows, the md then says PARTIAL); the pytest log is appended to kv_speed.md at the end.
# Assumes the runner sourced `benchmarks/device_smollm2.sh env` and `taskdata` (SmolLM2 and the task data).
#
#   bash benchmarks/h200_kv_varlen.sh OUTDIR                                        # on the H200
#   KV_DEVICE=cpu KV_LENGTH=256 KV_NEW=4 KV_REPEATS=1 KV_BATCH=2 KV_EXTRA=--quick-calibration KV_TIME_SCALE=10 \
#     bash benchmarks/h200_kv_varlen.sh /tmp/kvvarlen                               # CPU smoke test
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${1:?usage: bash benchmarks/h200_kv_varlen.sh OUTDIR}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
DEV="${KV_DEVICE:-cuda}"
L="${KV_LENGTH:-4096}"
NEW="${KV_NEW:-64}"
REPEATS="${KV_REPEATS:-6}"
BATCH="${KV_BATCH:-8}"
POLICIES="${KV_POLICIES:-full snapkv h2o moa task_kv moa@grouped task_kv@grouped}"
EXTRA="${KV_EXTRA:-}"
S="${KV_TIME_SCALE:-1}"      # multiplies the timeouts (CPU smoke tests only)
LOG="$(mktemp /tmp/kv_varlen_pytest.XXXXXX)"
T0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }

stamp "tests: pytest -m gpu tests/kv"
timeout $(( 30 * S )) python3 -m pytest -m gpu tests/kv -q -rA -s -p no:cacheprovider > "$LOG" 2>&1 \
  || echo "FAILED or timed out: gpu tests (exit $?)"
tail -n 40 "$LOG"

stamp "speed: $L tokens, $NEW new, batch $BATCH, $POLICIES, $REPEATS repeats, then ops per step; device $DEV"
# shellcheck disable=SC2086
timeout $(( 200 * S )) python3 benchmarks/kv_speed.py --device "$DEV" --length "$L" --new "$NEW" --budget 0.3 \
  --repeats "$REPEATS" --batch $BATCH --policies $POLICIES --ops $EXTRA \
  --out "$OUTDIR/kv_speed" \
  || echo "FAILED or timed out: speed (exit $?; the files hold the rows that finished)"
rm -f "$OUTDIR"/kv_speed.*.tmp

{ echo; echo "## pytest -m gpu tests/kv (last 60 lines)"; echo; echo '```'; tail -n 60 "$LOG"; echo '```'; } \
  >> "$OUTDIR/kv_speed.md"
rm -f "$LOG"
stamp "done"
