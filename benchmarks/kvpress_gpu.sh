#!/usr/bin/env bash
# kvpress (NVIDIA; pins transformers < 5.3) beside attnlab's policies on the H200, same needle samples.
#
# Why a separate call: the kvpress wheels (transformers 5.2.0 + tokenizers 0.22.2 + kvpress and its small
# pure-Python needs, ~15 MB) do not fit in one device call beside SmolLM2's second GGUF half (48 MB, see
# device_smollm2.sh) and the repository (64 MiB per call). So, on a machine that device_smollm2.sh's
# `env` step has already prepared (still warm: /tmp/smol and /tmp/attnlab_cache are there):
#
#   here, once:        bash benchmarks/kvpress_gpu.sh split          # writes .kvwhl/ (git-ignored)
#   device call (carry .kvwhl .smolB .whl):
#       source benchmarks/device_smollm2.sh env; bash benchmarks/kvpress_gpu.sh run "$OUT/kvpress"
#
# HARD WALL-CLOCK BUDGET of `run`: 4 minutes (240 s): samples 50 s, presses 130 s, attnlab 40 s, table 20 s.
# kvpress runs with its own transformers from /tmp/kvsite first on PYTHONPATH; attnlab's side runs here
# too, on the same samples (40 s), so the table never mixes runs. Writes 2 files into OUTDIR:
# kvpress_compare.md and kvpress_compare.json.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  split)
    mkdir -p .git/info .kvwhl
    grep -qxF /.kvwhl/ .git/info/exclude 2>/dev/null || echo /.kvwhl/ >> .git/info/exclude
    dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .kvwhl "$@"; }
    dl transformers==5.2.0 tokenizers==0.22.2 kvpress==0.5.5 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
      fire==0.7.1 termcolor==3.3.0 cachetools==5.5.2  # fire 0.6 (kvpress: <0.7) has no wheel; only imported
    du -sh .kvwhl
    ;;
  run)
    OUTDIR="${2:?usage: kvpress_gpu.sh run OUTDIR}"
    mkdir -p "$OUTDIR"
    N="${KVP_SAMPLES:-50}"; L="${KVP_LENGTH:-4096}"; DEV="${KVP_DEVICE:-cuda}"; BUDGET="${KVP_BUDGET:-0.3}"
    S="${KVP_TIME_SCALE:-1}"   # multiplies the timeouts (CPU tests only)
    TMP="$(mktemp -d)"
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    MAIN_PATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    PRESS_PY="${KVP_PRESS_PY:-python3}"   # a CPU test here may point this at /tmp/kvpress-venv/bin/python
    if [ -z "${KVP_PRESS_PY:-}" ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kvsite \
        .kvwhl/*.whl || { echo "FAILED: kvpress wheels"; exit 1; }
    fi
    F=(--samples-json "$TMP/samples.json" --press-json "$TMP/presses.json" --attnlab-json "$TMP/attnlab.json"
       --table "$OUTDIR/kvpress_compare.md" --budgets "$BUDGET" --device "$DEV")
    echo "== samples: needle x $N at $L tokens"
    PYTHONPATH="$MAIN_PATH" timeout $(( 50 * S )) python3 benchmarks/kvpress_compare.py samples "${F[@]}" --task needle \
      --length "$L" --samples "$N" --seed 0 --max-new-tokens 12 || { echo "FAILED: samples (exit $?)"; exit 1; }
    echo "== kvpress presses (transformers from /tmp/kvsite)"
    PYTHONPATH="/tmp/kvsite:$MAIN_PATH" timeout $(( 130 * S )) "$PRESS_PY" benchmarks/kvpress_compare.py press "${F[@]}" \
      || echo "FAILED or timed out: presses (exit $?; the table keeps the samples both sides finished)"
    echo "== attnlab policies on the same samples"
    PYTHONPATH="$MAIN_PATH" timeout $(( 40 * S )) python3 benchmarks/kvpress_compare.py attnlab "${F[@]}" --batch 10 \
      --policies streaming snapkv razor || echo "FAILED or timed out: attnlab side (exit $?)"
    PYTHONPATH="$MAIN_PATH" timeout $(( 20 * S )) python3 benchmarks/kvpress_compare.py table "${F[@]}" || echo "FAILED: table"
    ;;
  *) echo "usage: $0 split|run OUTDIR" >&2; exit 2 ;;
esac
