"""SmolLM2 decode / prefill 512 / batch 32 of two source trees, interleaved (issue 9's
no-regression check: the tree before the execution-plan change against today's).

    python benchmarks/smollm2_tree_ab.py OLD_TREE NEW_TREE --rounds 3 --out FILE.json

Each round runs one fresh process per tree (PYTHONPATH=TREE, this interpreter), old first,
and records decode tok/s (128 tokens after a 6-token prompt, the 1-token run subtracted),
prefill tok/s (512 tokens of emma.txt) and batch tok/s (32 prompts x 64 tokens), greedy,
quantization="auto" (the GGUF's own Q4_1), EMBER_NUM_THREADS threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROUND = r'''
import json, time
from pathlib import Path
from ember import LLM, SamplingParams
llm = LLM(quantization="auto", show_progress=False)
text = Path(TEXT).read_text()[20000:60000]
ids = list(llm.get_tokenizer().encode(text))[:512]
def run(prompts, params):
    t = time.perf_counter(); outs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - t, outs
greedy = lambda n: SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
run([[1, 2, 3, 4, 5, 6]], greedy(16))  # warm-up
prompt = [1, 504, 3458, 282, 260, 3938]
t1, _ = run([prompt], greedy(1))
t129, _ = run([prompt], greedy(129))
tp, _ = run([ids], greedy(1))
tb, outs = run([ids[8 * i: 8 * i + 16] for i in range(32)], greedy(64))
print(json.dumps({"decode_tok_s": 128 / (t129 - t1), "prefill_512_tok_s": 512 / tp,
                  "batch32_tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / tb}))
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--text", default=str(Path(__file__).resolve().parents[2] / "shared" /
                                          "data" / "emma.txt"))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rounds = []
    for r in range(args.rounds):
        row = {}
        for side, tree in (("old", args.old), ("new", args.new)):
            env = dict(os.environ, PYTHONPATH=tree)
            proc = subprocess.run([sys.executable, "-c", f"TEXT = {args.text!r}\n" + ROUND],
                                  cwd=tree, env=env, capture_output=True, text=True, check=True)
            row[side] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"round {r + 1}/{args.rounds} {side}: " + ", ".join(
                f"{k} {v:.0f}" for k, v in row[side].items()), flush=True)
        rounds.append(row)
    keys = list(rounds[0]["old"])
    summary = {k: {"old": statistics.median(x["old"][k] for x in rounds),
                   "new": statistics.median(x["new"][k] for x in rounds),
                   "new_over_old_paired_median": statistics.median(
                       x["new"][k] / x["old"][k] for x in rounds)} for k in keys}
    for k, v in summary.items():
        print(f"{k}: old {v['old']:.0f}, new {v['new']:.0f}, "
              f"new/old {v['new_over_old_paired_median']:.3f}x (paired median)")
    Path(args.out).write_text(json.dumps({
        "old": args.old, "new": args.new, "threads": os.environ.get("EMBER_NUM_THREADS"),
        "loadavg": os.getloadavg(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(sys.argv), "rounds": rounds, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
