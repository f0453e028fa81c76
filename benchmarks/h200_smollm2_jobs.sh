#!/usr/bin/env bash
# The SmolLM2 jobs on the H200: SmolLM2 staged by benchmarks/device_smollm2.sh, then each named
# benchmarks/h200_<name>.sh in parallel (one GPU, 16 CPU cores), each into $OUT/<name>/.
# Device call 1 (carry .smolA):       bash benchmarks/device_smollm2.sh stage
# Device call 2 (carry .smolB .whl):  bash benchmarks/h200_smollm2_jobs.sh "interventions kv seer_smollm2 icl"
# Timings taken while the others run share the GPU; scripts that report speed say so. Jobs named in an
# optional second argument run after those, one at a time, alone on the GPU:
#   bash benchmarks/h200_smollm2_jobs.sh "kv seer_smollm2" "kv_speed layer_drop_speed"
set -u
source benchmarks/device_smollm2.sh env || exit 1
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
python3 -c "import attnlab; attnlab.load('smollm2')" 2>&1 | tail -1  # convert the GGUF once, before the jobs
start=$(date +%s)
for name in $1; do
  mkdir -p "$OUT/$name"
  ( timeout "${JOB_SECONDS:-480}" bash "benchmarks/h200_$name.sh" "$OUT/$name" > "/tmp/log_$name.txt" 2>&1
    echo "== $name rc=$? after $(( $(date +%s) - start )) s" >> "/tmp/log_$name.txt" ) &
done
wait
# Then the jobs named in $2 one after another, each with the GPU to itself (timings).
for name in ${2:-}; do
  mkdir -p "$OUT/$name"
  timeout "${JOB_SECONDS:-480}" bash "benchmarks/h200_$name.sh" "$OUT/$name" > "/tmp/log_$name.txt" 2>&1
  echo "== $name (alone) rc=$? after $(( $(date +%s) - start )) s" >> "/tmp/log_$name.txt"
done
for name in $1 ${2:-}; do echo "########## $name"; tail -c 20000 "/tmp/log_$name.txt"; done > "$OUT/logs.txt"
# Only 8 files come back from the device: everything travels as one archive.
(cd "$OUT" && tar czf /tmp/all.tar.gz . && find . -mindepth 1 -delete && mv /tmp/all.tar.gz .)
for name in $1 ${2:-}; do echo "## $name"; tail -c 1500 "/tmp/log_$name.txt"; done
