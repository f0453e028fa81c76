#!/usr/bin/env bash
# In-context linear regression on the H200 (budget: 6 minutes wall). Usage: bash benchmarks/h200_icl.sh OUTDIR
# Writes OUTDIR/icl_regression.json; the markdown table is printed (and rebuilt from the JSON by
# `python3 -c "import json,sys; sys.path.insert(0,'benchmarks'); import icl_regression as m; print(m.markdown(json.load(open(sys.argv[1]))))" FILE`).
set -u
mkdir -p "$1"
timeout 350 python3 benchmarks/icl_regression.py --device cuda --steps ${ICL_STEPS:-15000} --no-progress \
  --out "$1/icl_regression" && rm -f "$1/icl_regression.md" || echo "FAILED icl_regression rc=$?"
