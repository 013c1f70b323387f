"""Gemma 3 270M: what the LM head's format costs in quality, plan by plan.

For each --quantization plan (default: native-q8head, the exact Q8_0 head, and native, whose
head is Q6): perplexity by the DESIGN protocol (first 2048 tokens of pride_and_prejudice.txt,
BOS per 512-token window) and greedy tokens against the dense fp32 reference (which
tests/models/test_gemma3_parity.py holds equal to transformers): the parity test's four prompts
(32 tokens) and its two passages (~300 and 700 tokens, 16 tokens each), counting the first
position where a plan parts from the reference.

    flock /tmp/ember-bench.lock python benchmarks/gemma_head_quality.py     # ~3 min quiet

Writes benchmarks/results/issue9/gemma3-head/head_quality.json (load average inside).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from ember import LLM, SamplingParams
from ember.eval.perplexity import perplexity
from ember.loading.sources import PACKAGED_MODELS, packaged_path

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "1, 2, 3, 4, 5,",
    "Once upon a time, in a small village by the sea, there lived",
]
PASSAGES = [(2000, 300), (40000, 700)]


def _cases(llm: LLM, text: str) -> list[tuple[list[int], int]]:
    tok = llm.get_tokenizer()
    cases = [(tok.encode(p), 32) for p in PROMPTS]
    cases += [(tok.encode(text[s:s + 6000])[:n], 16) for s, n in PASSAGES]
    return cases


def _greedy(llm: LLM, cases: list[tuple[list[int], int]]) -> list[list[int]]:
    out = []
    for ids, n in cases:
        params = SamplingParams(temperature=0, max_tokens=n, repetition_penalty=1.0,
                                ignore_eos=True)
        out.append(list(llm.generate([ids], params, use_tqdm=False)[0].outputs[0].token_ids))
    return out


def _first_diff(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quantization", action="append",
                    help="plans to compare (repeatable; default native-q8head and native)")
    ap.add_argument("--text", default="../shared/data/pride_and_prejudice.txt")
    ap.add_argument("--out", default="benchmarks/results/issue9/gemma3-head/head_quality.json")
    args = ap.parse_args()
    model = next(m for m in PACKAGED_MODELS if m.name == "gemma-3-270m")
    path = packaged_path(model)
    if path is None:
        raise SystemExit(f"Gemma 3 missing: {model.install_hint}")
    text = Path(args.text).read_text()
    result: dict = {"loadavg_start": os.getloadavg(), "model": str(path), "plans": {}}
    ref = LLM(str(path), quantization=None, cpu_kernels=False, show_progress=False,
              generation_config="none")
    cases = _cases(ref, text)
    want = _greedy(ref, cases)
    t0 = time.perf_counter()
    result["reference_ppl_2048"] = perplexity(ref, text, max_tokens=2048).perplexity
    print(f"dense fp32 reference: ppl {result['reference_ppl_2048']:.4f} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    del ref
    for q in args.quantization or ["native-q8head", "native"]:
        llm = LLM(str(path), quantization=q, show_progress=False, generation_config="none")
        plan = llm.engine.core.plan
        got = _greedy(llm, cases)
        ppl = perplexity(llm, text, max_tokens=2048).perplexity
        diffs = [_first_diff(g, w) for g, w in zip(got, want)]
        result["plans"][q] = {
            "plan": plan.describe(), "head": plan.head, "ppl_2048": ppl,
            "ppl_vs_reference": ppl / result["reference_ppl_2048"] - 1,
            "greedy_equal": sum(d is None for d in diffs), "greedy_cases": len(diffs),
            "first_divergence": diffs}
        print(f"{q}: head {plan.head} ppl {ppl:.4f} "
              f"({result['plans'][q]['ppl_vs_reference']:+.2%} vs dense fp32), greedy equal "
              f"{result['plans'][q]['greedy_equal']}/{len(diffs)} first divergence {diffs}",
              flush=True)
        del llm
    result["loadavg_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
