#!/usr/bin/env bash
# In-context linear regression on the H200 (budget: 6 minutes wall). Usage: bash benchmarks/h200_icl.sh OUTDIR
# Two processes: the paper's one-layer models, and the deeper softmax transformers. Each writes
# OUTDIR/icl_<part>.json (+ .md); the tables are rebuilt from the JSON with icl_regression.markdown().
set -u
mkdir -p "$1"
run() { timeout 350 python3 benchmarks/icl_regression.py --device cuda --steps ${ICL_STEPS:-15000} --no-progress \
          --out "$1/icl_$2" --configs "${@:3}" || echo "FAILED icl $2 rc=$?"; }
# One process per model (each is small and CPU-bound on the GPU machine); ICL_ONLY picks a subset by index.
names=("1 layer, 1 head (paper)" "1 layer, 2 heads (paper)" "1 layer, 4 heads (paper)" "4 layers, 4 heads, MLP" "8 layers, 4 heads, MLP")
for i in ${ICL_ONLY:-0 1 2 3 4}; do run "$1" "m$i" "${names[$i]}" & done
wait
