#!/usr/bin/env bash
# like decode_attention_ab.sh, but each argument is a directory holding a kernels tree
set -euo pipefail
threads=$1 kv=$2 mode=$3 reps=$4 depth=$5; shift 5
root=/work/main
tmp=$(mktemp -d)
read -r -a flags <<< "$(PYTHONPATH="$root" $root/.venv/bin/python -c 'from ember.kernels.build import \
  BASE_FLAGS, select_isa; print(" ".join((*BASE_FLAGS, *select_isa().cxxflags)))')"
libs=()
for d in "$@"; do
  n=$(basename $d)
  g++ "${flags[@]}" -I"$d" "$d/cpu_kernels.cpp" -o "$tmp/$n.so"
  libs+=("$tmp/$n.so")
done
g++ -O2 -std=c++17 "$root/benchmarks/decode_attention_ab.cpp" -o "$tmp/ab" -ldl
"$tmp/ab" "$threads" "$kv" "$mode" "$reps" "$depth" "${libs[@]}" | sed "s|$tmp/||; s|\.so\"|\"|"
rm -rf $tmp
