#!/usr/bin/env bash
# Session 5, round 2 (device tool, one H200; hard budget 240 s: 85 + 40 + 30 + 60 s of timeouts + start-up): the standard rows of the four Triton targets after
# round 1's sweep (benchmarks/h200_triton_sweep.sh) set new defaults, beside SDPA and FlexAttention, then
# every GPU test of tests/kernels.
#   bash benchmarks/h200_triton_confirm.sh OUTDIR
# 1. benchmarks/h200_local.py, cases 0/3/4: 1-D window N/16 at 32K, 2-D strided k=48 s=16, HaloNet blocks
#    (SDPA, FlexAttention row-major / tile-permuted, the Triton kernel, attnlab.attention = the defaults)
# 2. benchmarks/h200_block_sparse.py: SeerAttention layouts at 90% sparsity (causal SDPA, FlexAttention, Triton:
#    session 4's default launch and the library default now)
# 3. benchmarks/h200_grouped.py, cases 1/2: the 2-D tile-aligned rows (grouped dense, Triton route; Flex is in 1.)
# 4. pytest -m gpu tests/kernels through benchmarks/h200_triton_tests.sh (parallel parts: compiles dominate).
# The benchmarks run one at a time (nothing else on the GPU); the tests run after them.
# Writes exactly two files: OUTDIR/triton_confirm.md (the three scripts' tables and the test summary) and
# OUTDIR/triton_confirm.json (their JSON, one key per script); the parts are made in a scratch folder.
set -uo pipefail
FINAL="${1:-${OUT:-out}}"
mkdir -p "$FINAL"
FINAL="$(cd "$FINAL" && pwd)"
OUTDIR="$(mktemp -d)"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv,noheader
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

echo "== 1. h200_local.py (cases 0,3,4)"
OUT="$OUTDIR" TAG=_s5 CASES=0,3,4 FULL_CHECK=0 CHECK_TMA=0 FLEX=1 VARIANTS=0:0:1 \
  timeout -k 3 "${LOCAL_TIMEOUT:-85}" python3 benchmarks/h200_local.py 2>&1 | grep -v "^\s*$" | tail -25
echo "== 2. h200_block_sparse.py (90% sparsity)"
# Its own script, with two variants: session 4's default launch and the library's default now (plan tiles
# 128x64 for causal prefill; warps, stages and the masked-loop stages left to block_sparse_attention).
OUT="$OUTDIR" CORE=0 SEER_DENSITIES="0.10" FLEX=1 timeout -k 3 "${SEER_TIMEOUT:-40}" python3 - <<'PY' 2>&1 | tail -8
import sys
sys.path.insert(0, "benchmarks")
import h200_block_sparse as hb
hb.VARIANTS = [
    ("128x128 w8 s3, pipelined diagonal (session-4 default)",
     dict(q_tile=128, kv_tile=128, num_warps=8, num_stages=3, part_stages=None)),
    ("library default (128x64 w4 s2, unpipelined diagonal)", dict(q_tile=128, kv_tile=64)),
]
hb.main()
PY
echo "== 3. h200_grouped.py (cases 1,2)"
OUT="$OUTDIR" CASES=1,2 ROUTE=0 PROBE=0 FLEX=0 \
  timeout -k 3 "${GROUPED_TIMEOUT:-30}" python3 benchmarks/h200_grouped.py > /dev/null 2>&1
tail -8 "$OUTDIR/h200_grouped.md" 2>/dev/null

echo "== 4. pytest -m gpu tests/kernels (benchmarks/h200_triton_tests.sh: parallel parts, ${TEST_TIMEOUT:-60}s each)"
trap 'rm -rf "$OUTDIR"' EXIT
# its budget leaves each part TEST_TIMEOUT seconds (it keeps 11 s for start-up and the report)
BUDGET=$(( ${TEST_TIMEOUT:-60} + 11 )) bash benchmarks/h200_triton_tests.sh "$OUTDIR" | tail -12
python3 - "$OUTDIR" "$FINAL" <<'PY'
import json, os, sys
src, dst = sys.argv[1], sys.argv[2]
parts = [("h200_local.py", "h200_kernels_s5"), ("h200_block_sparse.py", "seer_h200_triton"), ("h200_grouped.py", "h200_grouped")]
md, js = ["# Triton targets, session 5 confirm run (benchmarks/h200_triton_confirm.sh)", ""], {}
for script, stem in parts:
    md += [f"## {script}", ""]
    try:
        md.append(open(os.path.join(src, stem + ".md")).read())
    except OSError as e:
        md.append(f"(no table: {e})")
    try:
        js[script] = json.load(open(os.path.join(src, stem + ".json")))
    except (OSError, ValueError) as e:
        js[script] = {"error": str(e)}
md += ["## pytest -m gpu tests/kernels", "", "```", open(os.path.join(src, "triton_tests.txt")).read(), "```"]
open(os.path.join(dst, "triton_confirm.md"), "w").write("\n".join(md) + "\n")
json.dump(js, open(os.path.join(dst, "triton_confirm.json"), "w"), indent=1)
PY
echo "confirm wall ${SECONDS}s"
ls -l "$FINAL"
