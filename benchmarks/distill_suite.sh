#!/usr/bin/env bash
# Distillation comparison on SmolLM2-135M-Instruct: a 15-layer student (half the teacher's
# layers) untrained vs trained with KD vs trained on plain next-token loss, with the same
# wall-clock training budget, then `ember eval` of each on the evaluation text.
#
# Usage: benchmarks/distill_suite.sh [OUT_DIR] [BUDGET_SECONDS]
set -euo pipefail
OUT=${1:-bench_out/compress}
BUDGET=${2:-900}
DATA=${DATA:-../shared/data}
TRAIN="$DATA/emma.txt $DATA/mansfield_park.txt $DATA/northanger_abbey.txt $DATA/sense_and_sensibility.txt"
EVAL_TEXT=$DATA/pride_and_prejudice.txt
export EMBER_NUM_THREADS=${EMBER_NUM_THREADS:-1}
EMBER=${EMBER:-.venv/bin/ember}
COMMON="--teacher smollm2-135m-instruct --student-layers 15 --data $TRAIN --batch-size 4
        --seq-len 256 --lr ${LR:-5e-4} --warmup-steps 5 --checkpoint-every 20 --eval-every 10"
mkdir -p "$OUT"
[ -f "$OUT/distill-untrained/ember.json" ] || \
  $EMBER distill $COMMON --steps 0 -o "$OUT/distill-untrained"
[ -f "$OUT/distill-kd/ember.json" ] || \
  $EMBER distill $COMMON --steps 100000 --time-budget "$BUDGET" -o "$OUT/distill-kd"
[ -f "$OUT/distill-nexttoken/ember.json" ] || \
  $EMBER distill $COMMON --steps 100000 --time-budget "$BUDGET" --no-teacher \
    --compare "$OUT/distill-kd" -o "$OUT/distill-nexttoken"
for d in distill-untrained distill-kd distill-nexttoken; do
  [ -f "$OUT/$d/eval.json" ] || $EMBER eval "$OUT/$d" --reference smollm2-135m-instruct \
      --text "$EVAL_TEXT" --json "$OUT/$d/eval.json"
done
