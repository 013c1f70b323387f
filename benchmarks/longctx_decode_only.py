"""Decode at depth 4096 and the prefill rows alone (SmolLM2 int4, 2 threads): the fast loop for
issue 16's decode and prefill rows.

One Ember process per KV cache dtype: a 4096-token prompt (emma.txt) is prefilled (timed to its
first token: prefill_4096), then --decode-tokens decode steps are timed on their own, --repeats
times (the prompt prefilled again each time: prefix caching off); the same at depth 16 (the
weights-only decode cost, for the split "attention = t(4096) - t(16)"), and a 512-token prompt's
prefill (prefill_512, for the ratio prefill_4096 / prefill_512). Best and median per decode
figure, medians of the prefill ones, the load average, one JSON line per dtype appended to
--out. The full row (llama.cpp beside Ember, perplexity) stays `ember bench offline
--long-context`; this one takes ~1 minute per dtype.

    PYTHONPATH=. flock /tmp/ember-bench.lock python benchmarks/longctx_decode_only.py \
        --kv bf16 --kv int8 --label X --out benchmarks/results/longctx/decode_only.jsonl

A/B against an earlier commit (its ember/ exported with `git archive`, no checkout), the two
trees interleaved --rounds times, one fresh process each:

    ... --base f49d4fb --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEPTH = 4096


def _rates(llm: object, prompt: list[int], tokens: int) -> tuple[float, float]:
    """(prefill tok/s to the first token, decode tok/s after it) for `prompt`."""
    from ember.bench.longctx import _prefill_then_decode

    r = _prefill_then_decode(llm, prompt, tokens)
    return r[f"prefill_{len(prompt)}_tok_s"], r[f"decode_{len(prompt)}_tok_s"]


def worker(kv: str, text: Path, tokens: int, repeats: int, threads: int) -> dict[str, object]:
    import torch

    from ember import LLM

    torch.set_num_threads(threads)
    llm = LLM("smollm2-135m-instruct", quantization="int4", dtype="float32",
              show_progress=False, enable_prefix_caching=False, kv_cache_dtype=kv,
              max_model_len=2 * DEPTH, kv_cache_mb=1024)
    tok = llm.get_tokenizer()
    ids = tok.encode(text.read_text(encoding="utf-8"), add_special_tokens=False)
    while len(ids) < DEPTH:
        ids = ids + ids
    _rates(llm, ids[:64], 8)  # warm-up
    short = [_rates(llm, ids[:16], tokens)[1] for _ in range(repeats)]
    p512, p4k, deep = [], [], []
    for _ in range(repeats):  # the two prefills interleaved
        p512.append(_rates(llm, ids[:512], 1)[0])
        p, d = _rates(llm, ids[:DEPTH], tokens)
        p4k.append(p)
        deep.append(d)
    ms_short, ms_deep = 1e3 / max(short), 1e3 / max(deep)
    return {"kv": kv, "prefill_512_tok_s_median": statistics.median(p512),
            f"prefill_{DEPTH}_tok_s_median": statistics.median(p4k),
            f"prefill_{DEPTH}_over_512": statistics.median(p4k) / statistics.median(p512),
            "decode_16_tok_s_best": max(short),
            "decode_16_tok_s_median": statistics.median(short),
            f"decode_{DEPTH}_tok_s_best": max(deep),
            f"decode_{DEPTH}_tok_s_median": statistics.median(deep),
            "ms_per_token_16": round(ms_short, 3), f"ms_per_token_{DEPTH}": round(ms_deep, 3),
            "attention_ms_estimate": round(ms_deep - ms_short, 3)}


def _run(tree: str, label: str, args: argparse.Namespace) -> None:
    for kv in args.kv or ["bf16"]:
        load = os.getloadavg()
        cmd = [sys.executable, __file__, "--worker", "--kv", kv, "--text", str(args.text),
               "--decode-tokens", str(args.decode_tokens), "--repeats", str(args.repeats),
               "--threads", str(args.threads)]
        env = dict(os.environ, PYTHONPATH=tree, EMBER_NUM_THREADS=str(args.threads))
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        row = {"label": label, **json.loads(out.strip().splitlines()[-1]),
               "threads": args.threads, "loadavg_before": load[0],
               "loadavg_after": os.getloadavg()[0], "contended": load[0] > 0.5}
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kv", action="append", choices=["bf16", "int8"])
    ap.add_argument("--text", type=Path, default=Path(__file__).resolve().parents[1].parent
                    / "shared" / "data" / "emma.txt")
    ap.add_argument("--decode-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--label", default="tree")
    ap.add_argument("--out", default=None)
    ap.add_argument("--base", default=None, help="git revision to A/B against (interleaved)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--worker", action="store_true")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.kv[0], a.text, a.decode_tokens, a.repeats, a.threads)))
        return
    root = Path(__file__).resolve().parent.parent
    if a.base is None:
        _run(str(root), a.label, a)
        return
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(root), "archive", a.base, "ember"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        for r in range(a.rounds):
            _run(tmp, f"base-{a.base} r{r + 1}", a)
            _run(str(root), f"{a.label} r{r + 1}", a)


if __name__ == "__main__":
    main()
