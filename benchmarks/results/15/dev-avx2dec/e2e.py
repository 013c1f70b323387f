"""One fresh-process run: prefill 512, decode after 16 and after 512 (N tokens), int4 SmolLM2."""
import json, sys, time
import torch
torch.set_num_threads(2)
from ember import LLM, SamplingParams
n = int(sys.argv[1])
llm = LLM(quantization="int4", dtype="float32", show_progress=False, enable_prefix_caching=False)
enc = llm.get_tokenizer().encode
def prompt(k):
    ids = enc("The quick brown fox jumps over the lazy dog. " * 200)
    return ids[:k]
p16, p512 = prompt(16), prompt(512)
def gen(p, m):
    return llm.generate([p], SamplingParams(max_tokens=m, temperature=0, ignore_eos=True), use_tqdm=False)
gen(p16, 2)
r = {}
t = time.perf_counter(); gen(p16, 1); f16 = time.perf_counter() - t
t = time.perf_counter(); gen(p512, 1); f512 = time.perf_counter() - t
r["prefill_512_tok_s"] = 512 / f512
for name, p, first in (("decode_16_tok_s", p16, f16), ("decode_512_tok_s", p512, f512)):
    t = time.perf_counter(); o = gen(p, n); dt = time.perf_counter() - t - first
    r[name] = (n - 1) / dt
    r[name.replace("tok_s", "tokens")] = list(o[0].outputs[0].token_ids[:6])
print(json.dumps(r))
