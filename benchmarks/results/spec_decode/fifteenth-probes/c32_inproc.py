"""32 concurrent sequences in one engine (max_num_seqs 32), 64 prompts of ~128 random words,
64 greedy tokens each (ignore_eos): speculation off vs suffix, alternating in one process."""
import sys, time, json, statistics
sys.path.insert(0, "/work/main")
from ember import LLM, SamplingParams
from ember.bench.serve import make_prompts
spec_cfg = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {"method": "suffix", "num_speculative_tokens": 16}
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
llms = {"off": LLM("smollm2-135m-instruct", show_progress=False, max_num_seqs=32),
        "on": LLM("smollm2-135m-instruct", show_progress=False, max_num_seqs=32, speculative_config=spec_cfg)}
params = SamplingParams(max_tokens=64, min_tokens=64, ignore_eos=True, temperature=0)
rates = {"off": [], "on": []}
outs = {}
for r in range(rounds):
    prompts = make_prompts(64, 128, seed=1000 + r)
    order = ["off", "on"] if r % 2 == 0 else ["on", "off"]
    for label in order:
        llm = llms[label]
        spec = llm.engine.core.spec
        before = (spec.stats.num_drafts, spec.stats.num_draft_tokens, spec.stats.num_accepted_tokens) if spec else None
        t0 = time.perf_counter()
        res = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        n = sum(len(o.outputs[0].token_ids) for o in res)
        outs[label] = [list(o.outputs[0].token_ids) for o in res]
        rates[label].append(n / dt)
        extra = ""
        if spec:
            after = (spec.stats.num_drafts, spec.stats.num_draft_tokens, spec.stats.num_accepted_tokens)
            extra = f" verify steps {after[0]-before[0]} drafts {after[1]-before[1]} accepted {after[2]-before[2]}"
        print(f"round {r} {label}: {n} tokens {dt:.2f} s {n/dt:.1f} tok/s{extra}", flush=True)
    print("  same greedy tokens:", outs["off"] == outs["on"], flush=True)
ratios = [a / b for a, b in zip(rates["on"], rates["off"])]
print("on/off per round", [round(x, 3) for x in ratios], "median", round(statistics.median(ratios), 3))
