#!/usr/bin/env bash
# Interventions on the H200: every registered intervention x five classification tasks (SST-2, AG News,
# TREC, CB, RTE), 4-shot, dev-split hyperparameter search, test accuracy uncalibrated and calibrated with
# 95% intervals and the paired delta, paper numbers beside ours; plus the layer-drop table (perplexity
# vs k in similarity and random order, SST-2 vs k, prefill speed-up at 1,024 tokens).
#
# HARD WALL-CLOCK BUDGET: 4 minutes (240 s) for the whole script. Every piece runs under `timeout`:
# warm-up load 50 s, then six processes in parallel on the one GPU (five tasks + layer drop) under
# `timeout $PIECE_S` (default 150 s) each, the accuracy ones stopping new cells after $DEADLINE_S
# (default 100 s; cells done are saved after each one), then a merge under `timeout 30`: 230 s at most.
#
# Usage (env already set up: `source benchmarks/device_smollm2.sh env`):
#   bash benchmarks/h200_interventions.sh OUTDIR
# Writes exactly two files: OUTDIR/interventions_h200.json and OUTDIR/interventions_h200.md.
# Knobs (environment): DEVICE (cuda), SAMPLES (test rows cap, 500), DEV_SAMPLES (100), BATCH (64),
# PIECE_S, DEADLINE_S, TASKS, LD_SST2 (SST-2 rows for layer drop, 500), LD_REPS (speed reps, 20).
# CPU smoke test (tiny, slow):  DEVICE=cpu SAMPLES=4 DEV_SAMPLES=4 BATCH=4 TASKS="cb" PIECE_S=1500 \
#   DEADLINE_S=1400 LD_SST2=4 LD_REPS=1 bash benchmarks/h200_interventions.sh /tmp/h200_iv
set -uo pipefail
OUTDIR=${1:?usage: $0 OUTDIR}
mkdir -p "$OUTDIR"
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
SAMPLES=${SAMPLES:-500}
DEV_SAMPLES=${DEV_SAMPLES:-100}
BATCH=${BATCH:-64}
PIECE_S=${PIECE_S:-150}
DEADLINE_S=${DEADLINE_S:-100}
TASKS=${TASKS:-"sst2 agnews trec cb rte"}
LD_SST2=${LD_SST2:-500}
LD_REPS=${LD_REPS:-20}
IV_ARGS=${IV_ARGS:-}  # extra arguments for interventions_accuracy.py, e.g. "--interventions act var"
TMP=$(mktemp -d)
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
T0=$SECONDS
echo "h200_interventions: device=$DEVICE samples=$SAMPLES dev=$DEV_SAMPLES batch=$BATCH tasks='$TASKS' tmp=$TMP"

# One load first: it converts the GGUF into the cache, which parallel loads would race on.
timeout 50 python3 -c "import attnlab, torch; m, t = attnlab.load(device='$DEVICE'); print('model loaded on', m.device, torch.__version__)" \
  || echo "FAILED warm-up load"

for task in $TASKS; do
  ( timeout "$PIECE_S" python3 benchmarks/interventions_accuracy.py --device "$DEVICE" --tasks "$task" \
      --samples "$SAMPLES" --dev-samples "$DEV_SAMPLES" --shots 4 --batch-size "$BATCH" --deadline "$DEADLINE_S" $IV_ARGS \
      --out "$TMP/acc_$task" 2>&1 | grep --line-buffered -v "^Loading weights" | sed -u "s/^/[$task] /" \
    || echo "FAILED accuracy $task (exit $?; cells finished before it are kept)" ) &
done
( timeout "$PIECE_S" python3 benchmarks/layer_drop.py --device "$DEVICE" --ks 0 1 2 4 6 8 12 --seeds 0 1 2 \
    --windows 8 --sst2 "$LD_SST2" --sst2-ks 0 4 8 --speed-ks 0 4 8 12 --speed-reps "$LD_REPS" --batch-size "$BATCH" \
    --out "$TMP/layer_drop.json" 2>&1 | grep --line-buffered -v "^Loading weights" | sed -u "s/^/[layer_drop] /" \
  || echo "FAILED layer_drop (exit $?)" ) &
wait
echo "pieces done after $((SECONDS - T0)) s"

TMP="$TMP" OUTDIR="$OUTDIR" TASKS="$TASKS" timeout 30 python3 - <<'EOF' || echo "FAILED merge"
import json, os, sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
from interventions_accuracy import markdown as acc_md  # noqa: E402
from layer_drop import markdown as ld_md  # noqa: E402

tmp, out = Path(os.environ["TMP"]), Path(os.environ["OUTDIR"])
runs = [json.loads(p.read_text()) for t in os.environ["TASKS"].split() if (p := tmp / f"acc_{t}.json").exists()]
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
ld = tmp / "layer_drop.json"
if ld.exists():
    result["layer_drop"] = json.loads(ld.read_text())
    md += ["## Attention-layer drop (paper 49)", "", json.dumps(result["layer_drop"]["meta"]), "",
           "similarity order: " + str(result["layer_drop"]["similarity_order"]), ""]
    try:
        md.append(ld_md(result["layer_drop"]))
    except Exception as err:  # a cut run may lack a section
        md.append(f"(table incomplete: {type(err).__name__}: {err})")
(out / "interventions_h200.json").write_text(json.dumps(result, indent=1))
(out / "interventions_h200.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
EOF
rm -rf "$TMP"
echo "h200_interventions: done in $((SECONDS - T0)) s; files: $(ls "$OUTDIR")"
