import sys, json
from pathlib import Path
sys.path.insert(0, "/work/main")
from ember import LLM, SamplingParams
from ember.bench.spec import workloads, encode_task
llm = LLM(sys.argv[1] if len(sys.argv) > 1 else "gemma-3-270m", show_progress=False)
tok = llm.get_tokenizer()
for name, task in workloads(Path("/work/shared/data")).items():
    ids = encode_task(llm, task.message, task.completion)
    out = list(llm.generate(ids, SamplingParams(max_tokens=256, temperature=0), use_tqdm=False)[0].outputs[0].token_ids)
    pset = set(tuple(ids[i:i+4]) for i in range(len(ids)-3))
    full = list(ids) + out
    from_prompt = from_self = 0
    seen = set()
    for i in range(len(ids), len(full)):
        g = tuple(full[i-3:i+1])
        if g in pset: from_prompt += 1
        elif g in seen: from_self += 1
        seen.add(g)
    n = len(out)
    print(json.dumps({"workload": name, "out_tokens": n, "4gram_in_prompt": round(from_prompt/n, 3), "4gram_repeats_own_output": round(from_self/n, 3), "new": round(1-(from_prompt+from_self)/n, 3)}))
    print("   ", repr(tok.decode(out)[:240]))
    print("   ...", repr(tok.decode(out)[-240:]), flush=True)
