#!/usr/bin/env bash
# Serving side by side: 1 and 32 concurrent streamed clients x 128 tokens through `ember serve`
# and through llama-cpp-python's OpenAI server, on the same GGUF with the same thread count,
# one server at a time (never both loaded). llama-cpp-python runs with --interrupt_requests false
# (its default cancels the running stream whenever a new request arrives). HF transformers batch 32 comes from
# `ember bench offline` (it has no server). Writes OUT/<label>/bench_serve.{json,png}.
#
# Usage: benchmarks/serve_vs_peers.sh [OUT_DIR]      env: THREADS (2), CONCURRENCY (1,32)
set -euo pipefail
OUT=${1:-bench_out/serve}
THREADS=${THREADS:-2}
CONCURRENCY=${CONCURRENCY:-1,32}
PY=${PY:-.venv/bin/python}
EMBER=${EMBER:-.venv/bin/ember}
MODEL=$($PY -c "from ember.loading.sources import resolve_model; print(resolve_model('smollm2-135m-instruct', ()).path)")
PORT=8431
mkdir -p "$OUT"

wait_ready() {  # url
  for _ in $(seq 1 240); do
    curl -sf "$1/v1/models" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "server at $1 did not come up" >&2; return 1
}

bench() {  # label
  "$EMBER" bench serve --url "http://127.0.0.1:$PORT" --concurrency "$CONCURRENCY" \
    --output-len 128 --input-len 64 --label "$1" --out "$OUT/$1" "${@:2}"
}

echo "== ember serve ($THREADS threads)"
EMBER_NUM_THREADS=$THREADS "$EMBER" serve --port $PORT --log-level warning --no-access-log \
  > "$OUT/ember-serve.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
wait_ready "http://127.0.0.1:$PORT"
bench ember
kill -TERM $PID; wait $PID || true

if $PY -c "import llama_cpp.server.app" 2>/dev/null; then
  echo "== llama-cpp-python server ($THREADS threads)"
  $PY -m llama_cpp.server --model "$MODEL" --n_threads "$THREADS" --n_threads_batch "$THREADS" \
    --n_ctx 4096 --flash_attn true --interrupt_requests false --port $PORT > "$OUT/llama-cpp-server.log" 2>&1 &
  PID=$!
  wait_ready "http://127.0.0.1:$PORT"
  bench llama-cpp-python --no-ignore-eos
  kill -TERM $PID; wait $PID || true
else
  echo "note: llama-cpp-python[server] not installed; llama.cpp server skipped"
fi
