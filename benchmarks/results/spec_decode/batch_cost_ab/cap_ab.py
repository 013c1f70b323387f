# A/B probe (eighteenth pass, Zen 3): several greedy streams at once, speculation off / `eagle` with the
# default cap (disable_by_batch_size 4) / `eagle` with no cap (1000: batch-priced drafts only).
# `EMBER_NUM_THREADS=2 python cap_ab.py 5 quote_passage,edit_passage,rewrite_code,story[,explain]`
import sys, time, statistics
from pathlib import Path
from ember import LLM, SamplingParams
from ember.bench.spec import workloads, encode_task
HEAD = "/tmp/eagle/heads/smollm2-eagle-s3.safetensors"
cfg = {"method": "eagle", "model": HEAD, "num_speculative_tokens": 16}
names = sys.argv[2].split(",")
off = LLM("smollm2-135m-instruct", show_progress=False)
cap4 = LLM("smollm2-135m-instruct", show_progress=False, speculative_config=cfg)
nocap = LLM("smollm2-135m-instruct", show_progress=False, speculative_config={**cfg, "disable_by_batch_size": 1000})
wl = workloads(Path("/work/shared/data"))
prompts = [encode_task(off, wl[n].message, wl[n].completion) for n in names]
params = SamplingParams(max_tokens=256, temperature=0)
rates = {"off": [], "cap4": [], "nocap": []}
for r in range(int(sys.argv[1])):
    order = [("off", off), ("cap4", cap4), ("nocap", nocap)]
    for name, llm in (order if r % 2 == 0 else order[::-1]):
        t = time.perf_counter(); res = llm.generate(prompts, params, use_tqdm=False); dt = time.perf_counter() - t
        rates[name].append(sum(len(o.outputs[0].token_ids) for o in res) / dt)
m = {k: statistics.median(v) for k, v in rates.items()}
print(f"{len(prompts)} streams: off {m['off']:.1f} cap4 {m['cap4']/m['off']:.3f} nocap {m['nocap']/m['off']:.3f}")
print({k: [round(x, 1) for x in v] for k, v in rates.items()})
print("batch_cost:", {b: round(c.row_cost(b) or -1, 3) for b, c in nocap.engine.core.spec.batch_cost.items()})
