#!/bin/bash
# usage: ab.sh ROUNDS N TREE_A TREE_B [isa]  -> lines "A {...}" / "B {...}"
R=$1; N=$2; A=$3; B=$4; ISA=${5:-}
for i in $(seq 1 $R); do
  if [ $((i % 2)) = 1 ]; then order="A B"; else order="B A"; fi
  for v in $order; do
    if [ $v = A ]; then T=$A; else T=$B; fi
    out=$(cd /tmp && env EMBER_NUM_THREADS=2 OMP_NUM_THREADS=2 ${WAIT:+OMP_WAIT_POLICY=$WAIT} ${ISA:+EMBER_CPU_ISA=$ISA} PYTHONPATH=$T /work/main/.venv/bin/python /tmp/avx2dec/e2e2.py $N 2>/tmp/avx2dec/e2e2_$v.err | tail -1)
    echo "$v $(cat /proc/loadavg | cut -d' ' -f1) $out"
  done
done
