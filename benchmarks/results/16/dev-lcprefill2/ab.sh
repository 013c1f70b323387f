#!/bin/bash
# main vs lcprefill2, the real bench worker (python -m ember.bench.longctx), interleaved
for r in 1 2; do
  for t in /work/main /work/wt/lcprefill2; do
    cd $t
    echo "r$r $t $(PYTHONPATH=$t EMBER_NUM_THREADS=2 timeout 100 /work/main/.venv/bin/python -m ember.bench.longctx --model-path smollm2-135m-instruct --kv bf16 --text /work/shared/data/emma.txt --decode-tokens 2 2>/dev/null | tail -1)"
  done
done
cat /proc/loadavg; date -u
