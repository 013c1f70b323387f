"""Decode speed with the fused decoder's projections in the huge-page arena (ember/kernels/
arena.py) vs left where loading put them: two engines on the same model in ONE process, decode
timed round by round alternately (machine noise hits both alike); medians and the ratio.
Greedy tokens of both are checked equal first.

    flock /tmp/ember-bench.lock python benchmarks/decode_arena_ab.py --model gemma-3-270m
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import ember.kernels.decoder as decoder_mod
from ember import LLM, SamplingParams
from ember.loading.sources import PACKAGED_MODELS, packaged_path


def _engine(path: str, arena: bool) -> LLM:
    saved = decoder_mod.relocate
    if not arena:
        decoder_mod.relocate = lambda tensors: 0  # type: ignore[assignment]
    try:
        return LLM(path, show_progress=False, generation_config="none",
                   enable_prefix_caching=False)
    finally:
        decoder_mod.relocate = saved  # type: ignore[assignment]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = str(packaged_path(next(m for m in PACKAGED_MODELS if m.name == args.model)))
    engines = {"arena": _engine(path, True), "plain": _engine(path, False)}
    ids = list(range(1000, 1016))
    full = SamplingParams(temperature=0, max_tokens=args.tokens + 1, ignore_eos=True)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    toks = {k: e.generate([ids], full, use_tqdm=False)[0].outputs[0].token_ids
            for k, e in engines.items()}
    assert toks["arena"] == toks["plain"], "arena changed the greedy tokens"
    load0 = os.getloadavg()
    rates: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(args.rounds):
        for k, e in engines.items():
            t = time.perf_counter()
            e.generate([ids], one, use_tqdm=False)
            t1 = time.perf_counter()
            e.generate([ids], full, use_tqdm=False)
            t2 = time.perf_counter()
            rates[k].append(args.tokens / ((t2 - t1) - (t1 - t)))
    med = {k: statistics.median(v) for k, v in rates.items()}
    res: dict[str, Any] = {"model": args.model, "threads": args.threads,
                           "decode_tok_s": rates, "median": med,
                           "arena_over_plain": med["arena"] / med["plain"],
                           "loadavg_before": load0, "loadavg_after": os.getloadavg()}
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
