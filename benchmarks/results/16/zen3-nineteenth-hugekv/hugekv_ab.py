"""In-process interleaved A/B: KV cache in 4 KB pages (torch.empty) vs huge pages."""
import json, statistics, sys, time, torch
torch.set_num_threads(2)
from ember import LLM, SamplingParams
import ember.runner.model_runner as MR
from ember.bench.longctx import _prefill_then_decode
real = MR.huge_page_empty
def make(huge):
    MR.huge_page_empty = real if huge else (lambda shape, dtype: torch.empty(tuple(shape), dtype=dtype))
    llm = LLM("smollm2-135m-instruct", quantization="int4", dtype="float32", show_progress=False,
              enable_prefix_caching=False, kv_cache_dtype=sys.argv[1], max_model_len=8192, kv_cache_mb=int(sys.argv[2]))
    MR.huge_page_empty = real
    return llm
engines = {"4k": make(False), "huge": make(True)}
ids = engines["4k"].get_tokenizer().encode(open("../shared/data/emma.txt").read()[:60000], add_special_tokens=False)[:4096]
for e in engines.values():  # touch the pool once (first-touch faults out of the timings)
    for _ in range(3): _prefill_then_decode(e, ids, 8)
res = {k: {"p4096": [], "d4096": [], "d16": []} for k in engines}
rounds = int(sys.argv[3])
for r in range(rounds):
    for k in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
        x = _prefill_then_decode(engines[k], ids, 64)
        y = _prefill_then_decode(engines[k], ids[:16], 64)
        res[k]["p4096"].append(x["prefill_4096_tok_s"]); res[k]["d4096"].append(x["decode_4096_tok_s"]); res[k]["d16"].append(y["decode_16_tok_s"])
    print(r, {k: {f: round(v[-1], 1) for f, v in d.items()} for k, d in res.items()}, flush=True)
med = {k: {f: statistics.median(v) for f, v in d.items()} for k, d in res.items()}
print("median", json.dumps(med))
print("ratio huge/4k", {f: round(med["huge"][f] / med["4k"][f], 3) for f in med["4k"]})
print("paired d4096 ratios", [round(h / b, 3) for h, b in zip(res["huge"]["d4096"], res["4k"]["d4096"])])
json.dump({"kv": sys.argv[1], "kv_cache_mb": int(sys.argv[2]), "rounds": res, "median": med}, open(sys.argv[4], "w"), indent=1)
