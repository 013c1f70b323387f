"""Interleaved single-stream decode speed of several model variants (one process, round robin).

On a shared machine a single timed run per model (what `ember eval` does) mostly measures the
neighbours' load at that moment; interleaving the variants round by round makes them share the
same conditions. Prints best / median tok/s per model and, with --update-eval, writes the
result into each variant's eval.json (decode_tok_s = median round; the runs are kept).

Usage: python benchmarks/compress_decode_speed.py MODEL... --text FILE [--rounds 7]
       [--tokens 64] [--update-eval] [--json OUT.json]
MODEL is a model name / path; for a directory holding eval.json that file is updated.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from ember import LLM
from ember.eval.quality import decode_speed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--text", required=True)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--update-eval", action="store_true")
    ap.add_argument("--reference-json", default=None,
                    help="eval JSON of a model given by name (e.g. the packaged reference)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    engines = {m: LLM(m, kv_cache_mb=64, show_progress=False) for m in args.models}
    first = next(iter(engines.values()))
    text = Path(args.text).read_text(encoding="utf-8")
    prompt = first.get_tokenizer().encode(text, add_special_tokens=False)[:32]
    runs: dict[str, list[float]] = {m: [] for m in args.models}
    for r in range(args.rounds):
        order = args.models if r % 2 == 0 else list(reversed(args.models))
        for m in order:
            runs[m] += decode_speed(engines[m], prompt, args.tokens, repeats=1)
        print(f"round {r + 1}/{args.rounds}: " +
              ", ".join(f"{Path(m).name} {runs[m][-1]:.1f}" for m in args.models), flush=True)
    summary = {m: {"best": max(v), "median": statistics.median(v), "runs": v}
               for m, v in runs.items()}
    for m, s in summary.items():
        print(f"{m:60s} best {s['best']:6.1f}  median {s['median']:6.1f} tok/s")
        target = Path(m) / "eval.json"
        if m == args.models[0] and args.reference_json:
            target = Path(args.reference_json)
        if args.update_eval and target.is_file():
            data = json.loads(target.read_text())
            data.update(decode_tok_s=s["median"], decode_tok_s_runs=s["runs"],
                        decode_measurement=f"interleaved, {args.rounds} rounds x "
                                           f"{args.tokens} tokens, median round")
            target.write_text(json.dumps(data, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
