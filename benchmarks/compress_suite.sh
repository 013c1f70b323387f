#!/usr/bin/env bash
# Compression suite on SmolLM2-135M-Instruct: every variant of issue 5's table, then one
# `ember eval` pass (reference loaded once) and the report. Sequential on purpose (shared CPU).
#
# Usage: benchmarks/compress_suite.sh [OUT_DIR] [STAGE...]   stages: quant prune struct eval report
# Env: EMBER_NUM_THREADS (default 1: on a busy 2-core machine one thread is several times faster)
set -euo pipefail
OUT=${1:-bench_out/compress}; shift || true
STAGES=${*:-quant prune struct eval report}
DATA=${DATA:-../shared/data}
CALIB="$DATA/emma.txt $DATA/mansfield_park.txt $DATA/northanger_abbey.txt $DATA/sense_and_sensibility.txt"
EVAL_TEXT=$DATA/pride_and_prejudice.txt
export EMBER_NUM_THREADS=${EMBER_NUM_THREADS:-1}
EMBER=${EMBER:-.venv/bin/ember}
mkdir -p "$OUT"
run() { local name=$1; shift; if [ -f "$OUT/$name/ember.json" ]; then echo "skip $name"; return; fi
        echo "== $name"; /usr/bin/time -f "$name: %e s wall" "$EMBER" "$@" -o "$OUT/$name"; }

for stage in $STAGES; do case $stage in
quant)
  run rtn-int8 quantize --method rtn --bits 8 --group-size 0 --symmetric --embeddings int8
  for m in rtn gptq awq; do
    run $m-int4-g128 quantize --method $m --bits 4 --group-size 128 --embeddings int8 --calib $CALIB
    run $m-int3-g64 quantize --method $m --bits 3 --group-size 64 --embeddings int8 --calib $CALIB
  done ;;
prune)
  for m in magnitude wanda sparsegpt; do
    run $m-50 prune --method $m --sparsity 0.5 --calib $CALIB
    run $m-2of4 prune --method $m --pattern 2:4 --calib $CALIB
  done ;;
struct)
  run drop6 prune --drop-layers 6 --calib $CALIB
  run ffn075 prune --ffn-keep 0.75 --calib $CALIB ;;
eval)
  models=()
  for d in "$OUT"/*/; do [ -f "$d/ember.json" ] && [ ! -f "$d/eval.json" ] && models+=("$d"); done
  [ -f "$OUT/results/reference.json" ] || "$EMBER" eval smollm2-135m-instruct \
      --reference smollm2-135m-instruct --text "$EVAL_TEXT" --json "$OUT/results/reference.json"
  for d in "${models[@]}"; do
    "$EMBER" eval "$d" --reference smollm2-135m-instruct --text "$EVAL_TEXT" --json "$d/eval.json"
  done ;;
report)
  "$EMBER" eval --report "$OUT/results" "$OUT" --plot "$OUT/pareto.png" ;;
esac; done
