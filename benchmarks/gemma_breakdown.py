"""Gemma 3 270M int8 on the kernels: prefill-512 and decode speed of the fused decoder vs the
module path, and the output head alone (ms and GB/s: it is bandwidth-bound). Run under
`flock /tmp/ember-bench.lock`; writes benchmarks/results/issue9/gemma3/breakdown.json."""
import json, os, time, torch
from ember import LLM, SamplingParams
from ember.loading.sources import PACKAGED_MODELS, packaged_path
torch.set_num_threads(2)
load0 = os.getloadavg()
p = packaged_path(next(m for m in PACKAGED_MODELS if m.name == "gemma-3-270m"))
llm = LLM(str(p), show_progress=False, generation_config="none", enable_prefix_caching=False)
runner = llm.engine.core.runner; model = runner.model
tok = llm.get_tokenizer()
text = open(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "pride_and_prejudice.txt")).read()
ids = tok.encode(text[5000:20000])[:512]
res = {}
for name in ["fused", "module"]:
    if name == "module": runner.decoder = None
    p1 = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate([ids], p1, use_tqdm=False)
    t = time.perf_counter(); llm.generate([ids], p1, use_tqdm=False); pre = time.perf_counter() - t
    pd = SamplingParams(temperature=0, max_tokens=65, ignore_eos=True)
    short = ids[:16]
    t = time.perf_counter(); llm.generate([short], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False); t1 = time.perf_counter() - t
    t = time.perf_counter(); llm.generate([short], pd, use_tqdm=False); t65 = time.perf_counter() - t
    res[name] = {"prefill_512_tok_s": 512 / pre, "decode_tok_s": 64 / (t65 - t1)}
    print(name, res[name], flush=True)
head = model.lm_head
x = torch.randn(1, 640)
for _ in range(5): head(x)
t = time.perf_counter()
for _ in range(50): head(x)
dt = (time.perf_counter() - t) / 50
nbytes = head.q.numel() + head.d.numel() * 4
res["head_ms"] = dt * 1e3; res["head_gbs"] = nbytes / dt / 1e9
res["loadavg_before"] = load0; res["loadavg_after"] = os.getloadavg()
print(json.dumps(res))
out = "benchmarks/results/issue9/gemma3/breakdown.json"
os.makedirs(os.path.dirname(out), exist_ok=True)
with open(out, "w") as f:
    json.dump(res, f, indent=2)
print("wrote", out)
