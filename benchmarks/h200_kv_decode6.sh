#!/usr/bin/env bash
# Session 6, issue 4 "decode tokens/s with any compressed policy >= full": razor and streaming had no decode row in
# session 5's packed-path run (kv_speed_h200_s5.md). This runs benchmarks/h200_kv_varlen.sh ALONE on the GPU with
# its own settings (the jobs runner's environment may carry another job's KV_* values): batch 8, 4,096 prompt
# tokens, 64 new tokens, 4 interleaved repeats, full / razor / streaming / snapkv / moa. HARD BUDGET 240 s (the
# varlen script's own timeouts: tests 30 s + speed 200 s).
#   bash benchmarks/h200_kv_decode6.sh OUTDIR
set -uo pipefail
cd "$(dirname "$0")/.."
KV_DEVICE="${KV6_DEVICE:-cuda}" KV_LENGTH="${KV6_LENGTH:-4096}" KV_NEW="${KV6_NEW:-64}" KV_REPEATS="${KV6_REPEATS:-4}" \
  KV_BATCH="${KV6_BATCH:-8}" KV_POLICIES="full razor streaming snapkv moa" KV_EXTRA="${KV6_EXTRA:-}" \
  KV_TIME_SCALE="${KV6_TIME_SCALE:-1}" bash benchmarks/h200_kv_varlen.sh "${1:?usage: $0 OUTDIR}"
