#!/bin/bash
for t in tree tree_f32 tree; do
  echo "== $t" >&2
  PYTHONPATH=/tmp/lcp2/$t EMBER_NUM_THREADS=2 timeout 200 /work/main/.venv/bin/python /tmp/lcp2/prof2.py > /tmp/lcp2/out_$t.json
done
cat /proc/loadavg >&2
