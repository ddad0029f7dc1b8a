#!/usr/bin/env bash
# Everything the open issues need from a lent GPU, in ONE device call of ~9 minutes (a command may run
# 10, a session has 15 in all, a machine start takes 1-2). Each stage has its own time limit, logs
# to $OUT, and a failed stage does not stop the next. Prepared with scripts/gpu_carry.sh; run as
#   device run, carry [".gpu"], timeout_s 600:  bash scripts/gpu_session.sh
# Rehearse on a CPU (tiny sizes, same stages, a few minutes):  TINY=1 OUT=/tmp/gpu bash scripts/gpu_session.sh
#
# $OUT gets at most 8 files (the device returns no more): session.log (every stage's output),
# stages.jsonl (rc and seconds per stage), throughput.json (every pipeline incl. PixCell-256 at full
# size), ldm_gpu_metrics.jsonl, ldm_gpu_validation.png, generation_realism.json (C2ST/FD/cosine of
# the GPU-trained LDM, against held-out half A; its FD-segmenter column is in the shipped segmenter's
# feature space), throughput_ldm_gpu.json (its tiles/s at 20 and 4 steps).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_session}
TINY=${TINY:-0}
BUDGET_S=${BUDGET_S:-540}   # the whole script; the device call's timeout_s should be ~600
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
T0=$(date +%s)
LOG="$OUT/session.log"

if [ -d .gpu ] && [ ! -f /tmp/site/.done ]; then  # the packages the device image lacks
    mkdir -p /tmp/site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/*.whl \
        && tar xzf .gpu/imagecodecs-pruned.tgz -C /tmp/site && touch /tmp/site/.done
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} || export PYTHONPATH=$PWD

left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }
stage() {  # stage NAME LIMIT_S command...
    local name=$1 limit=$2; shift 2
    local cap; cap=$(left); [ "$limit" -gt "$cap" ] && limit=$cap
    if [ "$limit" -lt 10 ]; then echo "== $name skipped: budget spent" | tee -a "$LOG"; return; fi
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local s; s=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - s )), \"limit\": $limit}" \
        | tee -a "$OUT/stages.jsonl"
}

if [ "$TINY" = 1 ]; then
    DEVICE=cpu; THREADS=2
    BENCH=(--device cpu --pixcell tiny --size 64 --batches 1)
    ONLY=(--only macenko,segmenter,embedding-4,pixcell-256)
    RECIPE=/tmp/ldm_gpu_tiny.yaml
    sed -e 's/^crop_size: .*/crop_size: 128/' -e 's/^batch_size: .*/batch_size: 4/' \
        -e 's/^bank_size: .*/bank_size: 16/' -e 's/^block_out_channels: .*/block_out_channels: [32, 64]/' \
        -e 's/^layers_per_block: .*/layers_per_block: 1/' -e 's/^mixed_precision: .*/mixed_precision: "no"/' \
        -e 's/^threads: .*/threads: 2/' -e 's/^validation_steps: .*/validation_steps: 2/' \
        training/recipes/ldm_gpu.yaml > "$RECIPE"
    CAL_STEPS=25; TRAIN_RESERVE=150; REALISM=(--steps 2)
else
    DEVICE=cuda; THREADS=8
    BENCH=(--device cuda)
    ONLY=()
    RECIPE=training/recipes/ldm_gpu.yaml
    CAL_STEPS=75; TRAIN_RESERVE=220; REALISM=(--steps 20)
fi
RUN=${RUN:-runs/ldm_gpu}

stage env 30 "$PY" -c "import torch, diffusers, kornia, imagecodecs, studio; print('torch', torch.__version__, \
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', \
'diffusers', diffusers.__version__, 'kornia', kornia.__version__)"
stage pytest_gpu 90 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda_paths.py
stage throughput 150 "$PY" bench/throughput.py "${BENCH[@]}" "${ONLY[@]}" --out "$OUT/throughput.json"

# LDM: a short timed run sizes max_steps to what is left (minus the evaluation's reserve)
rm -rf "$RUN" "$RUN.calibrate"
stage ldm_calibrate 90 "$PY" -m training.ldm --config "$RECIPE" --max-steps "$CAL_STEPS" --output-dir "$RUN.calibrate"
per_step=$("$PY" - "$RUN.calibrate/metrics.jsonl" <<'PYEOF'
import json, sys
try:
    rows = [r for r in map(json.loads, open(sys.argv[1])) if "time" in r and "loss" in r]  # one row per 25 steps
except OSError:
    rows = []
if len(rows) > 1:  # the rate between the logged rows leaves out the first steps' warm-up
    print(max(1e-3, (rows[-1]["time"] - rows[0]["time"]) / (rows[-1]["step"] - rows[0]["step"])))
else:
    print(rows[-1]["time"] / rows[-1]["step"] if rows else 1.0)
PYEOF
)
train_s=$(( $(left) - TRAIN_RESERVE ))
steps=$("$PY" -c "print(max(10, int(0.85 * $train_s / max($per_step, 1e-3))))")
echo "calibration: ${per_step}s/step; training ${steps} steps in <= ${train_s}s" | tee -a "$LOG"
stage ldm_train "$(( train_s + 20 ))" "$PY" -m training.ldm --config "$RECIPE" --max-steps "$steps" \
    --max-minutes "$("$PY" -c "print(round(max(0.2, ($train_s - 30) / 60), 2))")" --output-dir "$RUN"
cp "$RUN/metrics.jsonl" "$OUT/ldm_gpu_metrics.jsonl" 2>/dev/null
last_png=$(ls "$RUN"/validation/*.png 2>/dev/null | tail -1); [ -n "$last_png" ] && cp "$last_png" "$OUT/ldm_gpu_validation.png"

if [ -d "$RUN/final" ]; then
    stage realism 150 "$PY" bench/generation.py --only realism --skip-baselines --checkpoint "$RUN/final" \
        --device "$DEVICE" --threads "$THREADS" "${REALISM[@]}" --out "$OUT"
    stage ldm_speed 50 "$PY" bench/throughput.py "${BENCH[@]}" --only embedding-4,embedding-20 \
        --embedding-ldm "$RUN/final" --size 256 --out "$OUT/throughput_ldm_gpu.json"
fi
echo "done in $(( $(date +%s) - T0 ))s; wrote:" | tee -a "$LOG"
ls -la "$OUT" | tee -a "$LOG"
