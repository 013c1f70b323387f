"""Where a Gemma 3 270M decode token's time goes: input preparation, the fused decoder layers,
the LM head, the sampler (greedy argmax over 262k logits) and the rest of the engine step
(scheduler, detokenizer, Python), per quantization plan.

    flock /tmp/ember-bench.lock python benchmarks/gemma_decode_profile.py \
        --quantization native --quantization native-q6head

Writes benchmarks/results/issue9/gemma3-q6head/decode_profile.json (load average inside: a
busy machine's figures are contended, labelled so). The layer formats' A/B (README "Layer
formats of the native plan"):

    flock /tmp/ember-bench.lock python benchmarks/gemma_decode_profile.py \
        --quantization native-q4q8 --quantization native-q4q8+int4k \
        --quantization native-q4q8+int6 --quantization native \
        --out benchmarks/results/issue9/gemma3-layer-formats/decode_profile.json
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch


def _timed(obj: Any, name: str, key: str, acc: dict[str, float]) -> None:
    fn: Callable[..., Any] = getattr(obj, name)

    def wrapper(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc[key] += time.perf_counter() - t

    setattr(obj, name, wrapper)


def profile(quantization: str, tokens: int, threads: int) -> dict[str, Any]:
    """quantization: a plan name, or 'native-q4q8+FMT[+FMT]': that plan keeping the exact
    layer layout FMT ('int4k', 'int6') that ember.formats.repack.DECODE_FORMATS trades away
    (an A/B of one layout at a time; the plan's table is patched for this run only)."""
    import ember.plan
    from ember import LLM, SamplingParams
    from ember.loading.sources import PACKAGED_MODELS, packaged_path

    plan_name, *keep = quantization.split("+")
    table = ember.plan.DECODE_FORMATS
    ember.plan.DECODE_FORMATS = {k: v for k, v in table.items() if k not in keep}  # type: ignore[assignment]
    path = packaged_path(next(m for m in PACKAGED_MODELS if m.name == "gemma-3-270m"))
    try:
        llm = LLM(str(path), quantization=plan_name, show_progress=False,
                  generation_config="none", enable_prefix_caching=False)
    finally:
        ember.plan.DECODE_FORMATS = table  # type: ignore[assignment]
    core = llm._engine.core
    runner, model = core.runner, core.runner.model
    acc: dict[str, float] = collections.defaultdict(float)
    _timed(runner, "_prepare", "prepare", acc)
    _timed(model, "forward_fused", "layers", acc)
    _timed(model, "compute_logits", "head", acc)
    _timed(runner, "_sample", "sample", acc)
    _timed(runner, "execute", "execute", acc)
    ids = list(range(1000, 1016))

    def run(n: int) -> float:
        p = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        t = time.perf_counter()
        llm.generate([ids], p, use_tqdm=False)
        return time.perf_counter() - t

    run(4)
    acc.clear()
    one = run(1)
    first = dict(acc)
    acc.clear()
    total = run(tokens + 1) - one
    steps = tokens  # the first token's step is subtracted with `one`
    per = {k: (v - first.get(k, 0.0)) / steps * 1e3 for k, v in acc.items()}
    out: dict[str, Any] = {"token_ms": total / steps * 1e3,
                           **{f"{k}_ms": v for k, v in per.items()}}
    out["execute_other_ms"] = out["execute_ms"] - sum(
        out[f"{k}_ms"] for k in ("prepare", "layers", "head", "sample"))
    out["outside_execute_ms"] = out["token_ms"] - out["execute_ms"]
    # the sampler's greedy pick alone, on a head output
    logits = model.compute_logits(torch.randn(1, model.config.hidden_size))
    t = time.perf_counter()
    for _ in range(20):
        logits.argmax(dim=-1).tolist()
    out["argmax_262k_ms"] = (time.perf_counter() - t) / 20 * 1e3
    out["plan"] = core.plan.describe()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantization", action="append", default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/issue9/gemma3-q6head/decode_profile.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    res: dict[str, Any] = {"loadavg_before": load}
    for q in args.quantization or ["native", "native-q6head"]:
        res[q] = profile(q, args.tokens, args.threads)
        print(q, json.dumps(res[q], indent=1), flush=True)
    res["loadavg_after"] = os.getloadavg()
    res["contended"] = max(load[0], res["loadavg_after"][0]) > 0.5
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
