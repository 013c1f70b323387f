"""One fresh-process run: prefill 512 (best of 5), decode after 16 and after 512 (N tokens), int4
SmolLM2. Wall and process CPU time (all threads; with OMP_WAIT_POLICY=PASSIVE CPU time is the
work done, robust to preemption)."""
import json, sys, time
import torch
torch.set_num_threads(2)
from ember import LLM, SamplingParams
n = int(sys.argv[1])
llm = LLM(quantization="int4", dtype="float32", show_progress=False, enable_prefix_caching=False)
ids = llm.get_tokenizer().encode("The quick brown fox jumps over the lazy dog. " * 200)
p16, p512 = ids[:16], ids[:512]
def gen(p, m):
    return llm.generate([p], SamplingParams(max_tokens=m, temperature=0, ignore_eos=True), use_tqdm=False)
def timed(p, m):
    w, c = time.perf_counter(), time.process_time()
    o = gen(p, m)
    return time.perf_counter() - w, time.process_time() - c, o
gen(p16, 2); gen(p512, 1)
r = {}
pf = [timed(p512, 1)[:2] for _ in range(5)]
r["prefill_512_wall_ms"] = 1e3 * min(w for w, _ in pf)
r["prefill_512_cpu_ms"] = 1e3 * min(c for _, c in pf)
f16 = min(timed(p16, 1)[:2] for _ in range(3))
f512 = min(pf)
for name, p, first in (("d16", p16, f16), ("d512", p512, f512)):
    w, c, o = timed(p, n)
    r[name + "_wall_ms_tok"] = 1e3 * (w - first[0]) / (n - 1)
    r[name + "_cpu_ms_tok"] = 1e3 * (c - first[1]) / (n - 1)
    r[name + "_tokens"] = list(o[0].outputs[0].token_ids[:6])
print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}))
