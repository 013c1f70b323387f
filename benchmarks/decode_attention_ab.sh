#!/usr/bin/env bash
# In-process A/B of the decode attention kernel between git revisions (and/or the working tree:
# WORKTREE), at one depth (default 4096) on SmolLM2's geometry:
#   benchmarks/decode_attention_ab.sh [--threads N] [--kv bf16|int8] [--mode cold|hot|flush] [--reps N]
#                                     [--depth N] REV...
# e.g. benchmarks/decode_attention_ab.sh 9150e9c WORKTREE >> benchmarks/results/16/X.jsonl
# (one JSON line per revision on stdout)
# Each revision's ember/kernels is exported (git archive) and cpu_kernels.cpp built as a shared
# library with the engine's flags for this CPU (ember.kernels.build's ISA choice), then
# decode_attention_ab.cpp alternates the builds inside one process. cold: 30 distinct layer
# caches (streamed from memory where they exceed L3: depth 4096); flush: the same after reading
# 96 MB (as a real step's weights evict L3: short depths); hot: one layer's cache 30 times.
set -euo pipefail
threads=2 kv=bf16 mode=cold reps=40 depth=4096
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --threads) threads=$2 ;; --kv) kv=$2 ;; --mode) mode=$2 ;; --reps) reps=$2 ;;
    --depth) depth=$2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift 2
done
[[ $# -ge 1 ]] || { echo "usage: $0 [options] REV... (WORKTREE: the working tree)" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# the engine's own flags for this CPU (ember.kernels.build decides the ISA, once)
read -r -a flags <<< "$(PYTHONPATH="$root" "${PYTHON:-python3}" -c 'from ember.kernels.build import \
  BASE_FLAGS, select_isa; print(" ".join((*BASE_FLAGS, *select_isa().cxxflags)))')"
libs=()
for rev in "$@"; do
  dir="$tmp/$rev"
  mkdir -p "$dir"
  if [[ $rev == WORKTREE ]]; then
    cp "$root"/ember/kernels/*.h "$root"/ember/kernels/*.cpp "$dir"/
  else
    git -C "$root" archive "$rev" ember/kernels | tar -x -C "$dir" --strip-components=2
  fi
  g++ "${flags[@]}" -I"$dir" "$dir/cpu_kernels.cpp" -o "$tmp/$rev.so"
  libs+=("$tmp/$rev.so")
done
g++ -O2 -std=c++17 "$root/benchmarks/decode_attention_ab.cpp" -o "$tmp/ab" -ldl
echo "# $(lscpu | sed -n 's/^Model name: *//p'), load average $(cut -d' ' -f1 /proc/loadavg)" >&2
"$tmp/ab" "$threads" "$kv" "$mode" "$reps" "$depth" "${libs[@]}" | sed "s|$tmp/||; s|\.so\"|\"|"
