#!/usr/bin/env bash
# Interventions on the H200: every registered intervention x five classification tasks (SST-2, AG News,
# TREC, CB, RTE), 4-shot, dev-split hyperparameter search, test accuracy uncalibrated and calibrated with
# 95% intervals and the paired delta, paper numbers beside ours; plus the layer-drop table (perplexity
# vs k in similarity and random order, SST-2 vs k, prefill speed-up at 1,024 tokens).
#
# HARD WALL-CLOCK BUDGET: 4 minutes (240 s) for the whole script. Every piece runs under `timeout`:
# warm-up load 35 s; then, in parallel on the one GPU, one process per (task, group of interventions)
# plus the layer-drop quality run, each under `timeout $PIECE_S` (default 145 s), the accuracy ones
# starting no new cell after $DEADLINE_S (default 115 s; cells done are saved after each one); then the
# layer-drop prefill speed ALONE on the GPU (timeout 30 s); then a merge under `timeout 25`: 235 s at most.
# IV_GROUPS: interventions per process, groups separated by ";" (default: round 2 of session 3, zerotuning
# was measured in round 1: "selective_temperature layer_drop echoatt;head_modulation var;act"), with
# the same 500 test rows as round 1 (same baseline) and 50 dev rows. LD_QUALITY=1 adds the layer-drop
# perplexity and SST-2 tables (measured in round 1, so off by default).
#
# Usage (env already set up: `source benchmarks/device_smollm2.sh env`):
#   bash benchmarks/h200_interventions.sh OUTDIR
# Writes exactly two files: OUTDIR/interventions_h200.json and OUTDIR/interventions_h200.md.
# Knobs (environment): DEVICE (cuda), SAMPLES (test rows cap, 500), DEV_SAMPLES (50), BATCH (64),
# PIECE_S, DEADLINE_S, TASKS, IV_GROUPS, LD_QUALITY, LD_SST2 (500), LD_REPS (speed reps, 30), LD_SPEED_BATCH (8).
# CPU smoke test (tiny, slow; run as such at 20:30 UTC): DEVICE=cpu SAMPLES=4 DEV_SAMPLES=2 BATCH=4 TASKS=sst2 \
#   IV_GROUPS="selective_temperature;layer_drop" PIECE_S=500 DEADLINE_S=450 LD_REPS=1 LD_SPEED_BATCH=1 bash ... /tmp/out
set -uo pipefail
OUTDIR=${1:?usage: $0 OUTDIR}
mkdir -p "$OUTDIR"
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
SAMPLES=${SAMPLES:-500}
DEV_SAMPLES=${DEV_SAMPLES:-50}
BATCH=${BATCH:-64}
PIECE_S=${PIECE_S:-145}
DEADLINE_S=${DEADLINE_S:-115}
TASKS=${TASKS:-"sst2 agnews trec cb rte"}
LD_SST2=${LD_SST2:-500}
LD_REPS=${LD_REPS:-30}
GROUPS_SPEC=${IV_GROUPS:-"selective_temperature layer_drop echoatt;head_modulation var;act"}
LD_QUALITY=${LD_QUALITY:-0}  # 0: skip the layer-drop perplexity / SST-2 tables (speed only)
IV_ARGS=${IV_ARGS:-}  # extra arguments for interventions_accuracy.py, e.g. "--interventions act var"
TMP=$(mktemp -d)
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T0=$SECONDS
echo "h200_interventions: device=$DEVICE samples=$SAMPLES dev=$DEV_SAMPLES batch=$BATCH tasks='$TASKS' tmp=$TMP"

# One load first: it converts the GGUF into the cache, which parallel loads would race on.
timeout 35 python3 -c "import attnlab, torch; m, t = attnlab.load(device='$DEVICE'); print('model loaded on', m.device, torch.__version__)" \
  || echo "FAILED warm-up load"

IFS=';' read -ra GROUP_LIST <<< "$GROUPS_SPEC"
JOBS=()
for task in $TASKS; do
  g=0
  for group in "${GROUP_LIST[@]}"; do
    g=$((g + 1)); JOBS+=("acc_${task}_$g")
    ( timeout "$PIECE_S" python3 benchmarks/interventions_accuracy.py --device "$DEVICE" --tasks "$task" \
        --interventions $group --samples "$SAMPLES" --dev-samples "$DEV_SAMPLES" --shots 4 --batch-size "$BATCH" \
        --deadline "$DEADLINE_S" $IV_ARGS --out "$TMP/acc_${task}_$g" 2>&1 \
        | sed -u "/Loading weights/d; s/^/[$task.$g] /" \
      || echo "FAILED accuracy $task group $g (exit $?; cells finished before it are kept)" ) &
  done
done
if [ "$LD_QUALITY" = 1 ]; then
  ( timeout "$PIECE_S" python3 benchmarks/layer_drop.py --device "$DEVICE" --ks 0 1 2 4 6 8 12 --seeds 0 1 2 \
      --windows 8 --sst2 "$LD_SST2" --sst2-ks 0 4 8 --speed-ks --batch-size "$BATCH" \
      --out "$TMP/layer_drop.json" 2>&1 | sed -u "/Loading weights/d; s/^/[layer_drop] /" \
    || echo "FAILED layer_drop (exit $?)" ) &
fi
wait
echo "pieces done after $((SECONDS - T0)) s"
# prefill speed with the GPU to itself (in round 1 five other processes shared it)
DEVICE="$DEVICE" LD_REPS="$LD_REPS" LD_TIMEOUT=30 bash benchmarks/h200_layer_drop_speed.sh "$TMP" | sed -u "s/^/[speed] /"
echo "speed done after $((SECONDS - T0)) s"

TMP="$TMP" OUTDIR="$OUTDIR" JOBS="${JOBS[*]}" timeout 25 python3 - <<'EOF' || echo "FAILED merge"
import json, os, sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
from interventions_accuracy import markdown as acc_md  # noqa: E402  (imports no torch: fast)

tmp, out = Path(os.environ["TMP"]), Path(os.environ["OUTDIR"])
runs = [json.loads(p.read_text()) for j in os.environ["JOBS"].split() if (p := tmp / f"{j}.json").exists()]
result, md = {}, []
if runs:
    meta = dict(runs[0]["meta"], commands=[r["meta"]["command"] for r in runs],
                seconds=sum(r["meta"]["seconds"] for r in runs))
    meta["command"] = " ; ".join(meta["commands"])
    cells = [c for r in runs for c in r["cells"]]
    result["accuracy"] = dict(meta=meta, cells=cells)
    md.append(acc_md(cells, meta))
    md.append("Seconds per cell (dev search + test): " + ", ".join(
        f"{c['task']}/{c['intervention']} {c['seconds']:.0f}" for c in cells) + "\n")
else:
    md.append("# Interventions accuracy: no task finished a cell\n")
ld, speed = tmp / "layer_drop.json", tmp / "layer_drop_speed.json"
if ld.exists() or speed.exists():
    result["layer_drop"] = json.loads((ld if ld.exists() else speed).read_text())
    md += ["## Attention-layer drop (paper 49)", "", json.dumps(result["layer_drop"]["meta"]), "",
           "similarity order: " + str(result["layer_drop"]["similarity_order"]), ""]
    if ld.with_suffix(".md").exists():
        text = ld.with_suffix(".md").read_text()
        md.append(text.split("| k dropped (similarity order)")[0])  # its speed table is empty (measured alone below)
    if speed.exists():
        result["layer_drop"]["speed"] = json.loads(speed.read_text())["speed"]
        result["layer_drop"]["meta"]["speed"] = "measured alone on the device, after the other pieces"
        text = speed.with_suffix(".md").read_text() if speed.with_suffix(".md").exists() else ""
        md.append("Prefill speed, measured alone on the device:\n\n| k dropped (similarity order)"
                  + text.split("| k dropped (similarity order)")[-1] if text else "(speed table missing)")
(out / "interventions_h200.json").write_text(json.dumps(result, indent=1))
(out / "interventions_h200.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
EOF
rm -rf "$TMP"
echo "h200_interventions: done in $((SECONDS - T0)) s; files: $(ls "$OUTDIR")"
