#!/usr/bin/env bash
# Ray Serve throughput vs replicas on one machine, all with the same total threads:
#   plain `ember serve` (THREADS threads) | --ray 1 replica x THREADS | --ray THREADS x 1 thread
# each loaded by `ember bench serve` (same prompts, ignore_eos). JSON + PNG per configuration
# under benchmarks/results/ray/serve_<label>/.
#   usage: benchmarks/ray_serve.sh [CONCURRENCY=8] [NUM_PROMPTS=32] [OUTPUT_LEN=32]
#   (wrap in `flock /tmp/ember-bench.lock` on a shared machine)
set -euo pipefail
cd "$(dirname "$0")/.."
CONC=${1:-8}; NUM=${2:-32}; OUT_LEN=${3:-32}; THREADS=${THREADS:-2}
PY=${PYTHON:-python}
EMBER=("$PY" -c "import sys; from ember.cli import main; sys.exit(main())")
PORT=${PORT:-8765}
RESULTS=benchmarks/results/ray

run_one() {  # label, then `ember serve` arguments
  local label=$1; shift
  EMBER_NUM_THREADS=$THREADS "${EMBER[@]}" serve --port "$PORT" --log-level warning \
      --no-access-log "$@" > "/tmp/ember-ray-serve-$label.log" 2>&1 &
  SERVER_PID=$!
  trap 'kill -TERM $SERVER_PID 2>/dev/null; wait $SERVER_PID 2>/dev/null' EXIT
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$PORT/health" > /dev/null 2>&1 && break
    kill -0 $SERVER_PID 2>/dev/null || { cat "/tmp/ember-ray-serve-$label.log"; exit 1; }
    sleep 0.5
  done
  "${EMBER[@]}" bench serve --url "http://127.0.0.1:$PORT" --concurrency "$CONC" \
      --num-prompts "$NUM" --output-len "$OUT_LEN" --input-len 64 --label "$label" \
      --out "$RESULTS/serve_$label"
  kill -TERM $SERVER_PID; wait $SERVER_PID || true
  trap - EXIT
}

run_one plain
run_one ray_1x$THREADS --ray --num-replicas 1 --threads-per-replica "$THREADS"
run_one ray_${THREADS}x1 --ray --num-replicas "$THREADS" --threads-per-replica 1
echo "loadavg: $(cat /proc/loadavg)"
