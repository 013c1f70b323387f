#!/bin/bash
# Interleaved A/B: llama.cpp decode (llama-bench tg64), Ember main vs q5 branch (native), q5 native-q6head.
G=/root/.cache/ember/models/gemma-3-270m-q4_k_m.gguf
LB=~/.cache/ember-peers/llama.cpp-native/build/bin/llama-bench
PY=/work/main/.venv/bin/python
for r in 1 2; do
  echo "== round $r load $(cut -d' ' -f1-3 /proc/loadavg)"
  $LB -m $G -t 2 -p 0 -n 64 -r 1 -o json 2>/dev/null | $PY -c "import json,sys; d=json.load(sys.stdin); print('llama.cpp tg64', [round(x['avg_ts'],1) for x in d])"
  (cd /work/main && $PY /tmp/q5_snap2/benchmarks/gemma_decode_profile.py --quantization native --out /tmp/q5_ab/main_$r.json >/dev/null 2>&1); echo main native $(python3 -c "import json; d=json.load(open('/tmp/q5_ab/main_$r.json')); print({k: round(v['token_ms'],2) for k,v in d.items() if isinstance(v, dict)}, {k: round(v['layers_ms'],2) for k,v in d.items() if isinstance(v, dict)}, {k: round(v['head_ms'],2) for k,v in d.items() if isinstance(v, dict)})")
  (cd /tmp/q5_snap2 && PYTHONPATH=/tmp/q5_snap2 $PY benchmarks/gemma_decode_profile.py --quantization native --quantization native-q6head --out /tmp/q5_ab/q5_$r.json >/dev/null 2>&1); echo q5 $(python3 -c "import json; d=json.load(open('/tmp/q5_ab/q5_$r.json')); print({k: round(v['token_ms'],2) for k,v in d.items() if isinstance(v, dict)}, {k: round(v['layers_ms'],2) for k,v in d.items() if isinstance(v, dict)}, {k: round(v['head_ms'],2) for k,v in d.items() if isinstance(v, dict)})")
done
echo "== end load $(cut -d' ' -f1-3 /proc/loadavg)"
