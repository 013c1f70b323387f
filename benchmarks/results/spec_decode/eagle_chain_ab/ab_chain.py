# A/B probe (eighteenth pass): run as `EMBER_NUM_THREADS=2 python ab_chain.py ROUNDS story,explain OUT.json`;
# HEAD below is the 3-answer head from `ember train-draft-head` (defaults).
"""A/B: eagle head chained in C (new) vs the same fused step chained from Python (old loop)."""
import json, statistics, sys
from pathlib import Path
from ember import LLM
from ember.bench.spec import workloads, run_workloads, summarize
from ember.spec_decode.eagle import step_chain
HEAD = "/tmp/eagle/heads/smollm2-eagle-s3.safetensors"
cfg = {"method": "eagle", "model": HEAD, "num_speculative_tokens": 16}
base = LLM("smollm2-135m-instruct", show_progress=False)
new = LLM("smollm2-135m-instruct", show_progress=False, speculative_config=cfg)
old = LLM("smollm2-135m-instruct", show_progress=False, speculative_config=cfg)
head = old.engine.core.spec.proposer.head
head.chain = step_chain(head.step)
wl = workloads(Path("/work/shared/data"))
chosen = {k: wl[k] for k in sys.argv[2].split(",")}
res = run_workloads(base, new, chosen, 256, int(sys.argv[1]), compare=old)
for k, r in res.items():
    print(k, f"new {r['speedup']:.3f} old {r['compare_speedup']:.3f} identical {r['greedy_identical']}", flush=True)
new_g = statistics.geometric_mean([r['speedup'] for r in res.values()])
old_g = statistics.geometric_mean([r['compare_speedup'] for r in res.values()])
print(f"GEOMEAN new {new_g:.3f} old {old_g:.3f}")
json.dump(res, open(sys.argv[3], "w"), indent=1)
