# A/B probe (eighteenth pass, Zen 3): `EMBER_NUM_THREADS=2 python batch_ab.py ROUNDS story,explain[,quote_passage]`;
# HEAD: the 3-answer head from `ember train-draft-head` (defaults). Output below in runs.txt.
"""A/B at 2 (or 3) concurrent greedy streams: batch-aware draft cost (new) vs the single-stream
curve for every batch (old), vs speculation off."""
import sys, time, statistics
from pathlib import Path
from ember import LLM, SamplingParams
from ember.bench.spec import workloads, encode_task
HEAD = "/tmp/eagle/heads/smollm2-eagle-s3.safetensors"
cfg = {"method": "eagle", "model": HEAD, "num_speculative_tokens": 16}
names = sys.argv[2].split(",")
off = LLM("smollm2-135m-instruct", show_progress=False)
new = LLM("smollm2-135m-instruct", show_progress=False, speculative_config=cfg)
old = LLM("smollm2-135m-instruct", show_progress=False, speculative_config=cfg)
sp = old.engine.core.spec
sp._extra = lambda batch: sp.step_cost.extra
wl = workloads(Path("/work/shared/data"))
prompts = [encode_task(off, wl[n].message, wl[n].completion) for n in names]
params = SamplingParams(max_tokens=256, temperature=0)
rates = {"off": [], "new": [], "old": []}
outs = {}
for r in range(int(sys.argv[1])):
    order = [("off", off), ("new", new), ("old", old)]
    for name, llm in (order if r % 2 == 0 else order[::-1]):
        t = time.perf_counter()
        res = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t
        toks = sum(len(o.outputs[0].token_ids) for o in res)
        rates[name].append(toks / dt)
        outs[name] = [o.outputs[0].token_ids for o in res]
m = {k: statistics.median(v) for k, v in rates.items()}
print(f"{len(prompts)} streams: off {m['off']:.1f} new {m['new']:.1f} ({m['new']/m['off']:.3f}) old {m['old']:.1f} ({m['old']/m['off']:.3f}) identical {outs['new']==outs['off']==outs['old']}")
print({k: [round(x, 1) for x in v] for k, v in rates.items()})
print("batch_cost rows:", {b: round(c.row_cost(b) or -1, 3) for b, c in new.engine.core.spec.batch_cost.items()})
