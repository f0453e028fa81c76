#!/usr/bin/env bash
# Issue 4 on the H200: KV policies at 4K (needle + multikey), decode speed, retrieval-head masking.
# HARD WALL-CLOCK BUDGET: 5 minutes (300 s). Pieces, each under `timeout` (sum 300 s at most):
#   sweep 135 s   all 7 policies at budget 0.3, needle + multikey, 4,096 tokens, n=KV_SAMPLES (50) each,
#                 seed 0 (the reported seed), batches of 10 (accuracy does not depend on the batch)
#   tune   45 s   razor variants on seed 1 (tuning seed, never the reported one), needle + multikey
#   speed  45 s   decode/prefill tokens/s per policy, batch 1 and 8, 32 new tokens (kv_speed.py)
#   heads  55 s   retrieval-head masking: top-K vs random non-retrieval heads, n=30 needles
#                 (scores from benchmarks/results/retrieval_heads.json, scored earlier on CPU)
# Writes 2 files into OUTDIR: kv_h200.json (every result and prediction) and kv_h200.md (tables).
#
#   bash benchmarks/h200_kv.sh OUTDIR                                   # on the H200 (device_smollm2.sh env first)
#   KV_DEVICE=cpu KV_SAMPLES=2 KV_LENGTH=512 KV_HEADS_N=1 KV_TUNE_SAMPLES=2 KV_BATCH=2 KV_TIME_SCALE=20 KV_HEADS_LENGTHS=256 KV_HEADS_SECONDS=60 bash benchmarks/h200_kv.sh /tmp/kvtest   # CPU smoke test
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${1:?usage: bash benchmarks/h200_kv.sh OUTDIR}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
DEV="${KV_DEVICE:-cuda}"
N="${KV_SAMPLES:-50}"
L="${KV_LENGTH:-4096}"
B="${KV_BATCH:-10}"
HN="${KV_HEADS_N:-15}"          # needles per evaluation length (2 lengths): 30
TUNE_N="${KV_TUNE_SAMPLES:-30}"
S="${KV_TIME_SCALE:-1}"      # multiplies every timeout (CPU smoke tests only)
TMP="$(mktemp -d)"
T0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }

stamp "sweep: $N samples x 2 tasks at $L tokens, budget 0.3, device $DEV"
timeout $(( 135 * S )) python3 -m attnlab.cli kv sweep --task needle multikey --length "$L" --budgets 0.3 --samples "$N" \
  --seed 0 --max-new-tokens 12 --device "$DEV" --batch "$B" --no-progress --out "$TMP/sweep" \
  || echo "FAILED or timed out: sweep (exit $?)"

stamp "razor tuning on seed 1 ($TUNE_N samples per task)"
timeout $(( 45 * S )) python3 benchmarks/kv_razor_tune.py --task needle multikey --length "$L" --samples "$TUNE_N" --seed 1 \
  --batch "$B" --device "$DEV" --out "$TMP/tune.json" \
  || echo "FAILED or timed out: tune (exit $?)"

stamp "speed: batch 1 and 8"
timeout $(( 45 * S )) python3 benchmarks/kv_speed.py --device "$DEV" --length "$L" --new 32 --budget 0.3 --repeats 2 --batch 1 8 \
  --policies plain full streaming snapkv h2o razor moa task_kv --out "$TMP/speed" \
  || echo "FAILED or timed out: speed (exit $?)"

stamp "retrieval-head masking"
timeout $(( 55 * S )) python3 benchmarks/retrieval_heads.py --device "$DEV" --lengths 1024 2048 --score-depths 8 \
  --resume benchmarks/results/retrieval_heads.json --eval-lengths ${KV_HEADS_LENGTHS:-1024 2048} --eval-depths "$HN" --eval-seed 1 \
  --ks 5 10 20 --seeds 2 --max-seconds ${KV_HEADS_SECONDS:-42} --out "$TMP/retrieval_heads" \
  || echo "FAILED or timed out: retrieval heads (exit $?)"

stamp "merging into $OUTDIR"
timeout $(( 20 * S )) python3 benchmarks/kv_h200_report.py "$TMP" "$OUTDIR" || echo "FAILED: report (exit $?)"
stamp "done"
