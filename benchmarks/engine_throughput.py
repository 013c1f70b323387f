"""Engine throughput probe: single-stream decode and 16-request aggregate, offline.

Usage: python benchmarks/engine_throughput.py [--model NAME] [--dtype float32|bfloat16]
Prints tok/s and writes bench_out/engine_throughput.json (the full side-by-side comparison
with peers lives in `ember bench`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from ember import LLM, SamplingParams


def timed_generate(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args()
    llm = LLM(args.model, dtype=args.dtype, show_progress=False)
    tok = llm.get_tokenizer()
    prompt = tok.encode("It is a truth universally acknowledged, that a single man")  # 12 tokens
    timed_generate(llm, [prompt], 8)  # warm-up
    single, batch = [], []
    for _ in range(args.repeats):
        # decode rate: subtract the prefill + first token by timing 129 vs 1 tokens
        t_short, _ = timed_generate(llm, [prompt], 1)
        t_long, n = timed_generate(llm, [prompt], 129)
        single.append((n - 1) / (t_long - t_short))
        t, n = timed_generate(llm, [prompt] * 16, 128)
        batch.append(n / t)
    result = {
        "model": args.model, "dtype": args.dtype,
        "single_stream_decode_tok_s": statistics.median(single),
        "batch16_aggregate_tok_s": statistics.median(batch),
        "runs": {"single": single, "batch16": batch},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine_throughput.json").write_text(json.dumps(result, indent=2))
    print(f"single-stream decode: {result['single_stream_decode_tok_s']:.1f} tok/s")
    print(f"16 requests aggregate: {result['batch16_aggregate_tok_s']:.1f} tok/s")


if __name__ == "__main__":
    main()
